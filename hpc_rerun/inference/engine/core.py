"""The engine: Qwen3-VL through transformers, loaded once; prompts made as the users' processor makes them
(tables cut to the budget from one tokenisation, images resized by the processor itself); batches generated
packed (generator.py) or, for settings only HF implements, padded (padded.py).

Works the same for Qwen3-VL-8B-Instruct on a GPU and the tiny test model on a CPU.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor, Qwen3VLForConditionalGeneration
from transformers.image_utils import SizeDict

from ...pixels import pixel_limits
from ..tables import TableCut, TokenizedTable
from . import memory, padded
from .batches import BatchStream
from .generator import PackedGenerator
from .sampling import Sampling
from .sequences import Prompt, Sharing

# fit_image hands the processor a read-only view of an image's pixels (a copy of a 233 MP table would cost
# a second and 700 MB); torch warns that writing to it is undefined, and nothing does.
warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)

T = TypeVar("T")
FITS_KEPT = 4  # fitted images remembered: the tasks of one image (prepared together) and their re-asks fit it once
TABLE_SLOT = "\ue000table\ue000"  # where the table goes in a message (private-use characters)
JOIN_SLACK = 4  # tokens the joins around a table may differ from the parts counted alone


class PromptTooLong(ValueError):
    """A prompt that cannot be brought within its token budget (an image, or the text around a table)."""

    def __init__(self, full_tokens: int, budget: int):
        super().__init__(f"{full_tokens} prompt tokens, budget {budget}")
        self.full_tokens = full_tokens


@dataclass
class Request:
    """One prompt for the model: message text, optional image already fitted, generation settings, and
    (once ``Engine.prepare`` has made it) its ids for the packed engine and how its table was cut."""

    text: str
    image: Image.Image | None
    generation: dict
    prompt_tokens: int = 0
    extras: dict = field(default_factory=dict)
    prompt: Prompt | None = None
    cut: TableCut | None = None


@dataclass
class Encoded:
    """A batch after the processor (CPU work): packed prompts, or a left-padded batch for HF generate."""

    generation: dict
    prompt_tokens: int  # the batch's prompt tokens, unpadded
    prompts: list[Prompt] | None = None  # packed path
    sampling: Sampling | None = None
    padded: dict | None = None  # HF generate path

    @property
    def size(self) -> int:
        return len(self.prompts) if self.prompts is not None else self.padded["input_ids"].shape[0]


class Engine:
    def __init__(self, model_path: str, dtype: str = "auto", device: str | None = None,
                 prefill_tokens: int | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # Plan batches and prompt budgets as if the card had this much memory (a shared or MIG'd GPU), and hold
        # PyTorch's allocator to it, less what the CUDA context already takes: its cache then stays inside too.
        limit = os.environ.get(memory.GPU_MEMORY_ENV)
        self.total_gib = float(limit) if limit else None
        if self.total_gib and self.device.type == "cuda":
            memory.hold_allocator(self.device, self.total_gib)
        if dtype == "auto":
            torch_dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        else:
            torch_dtype = getattr(torch, dtype)
        # Straight onto the device (accelerate's device_map): no host copy of the weights first.
        self.model = Qwen3VLForConditionalGeneration.from_pretrained(
            model_path, dtype=torch_dtype, device_map=str(self.device)).eval()
        self.processor = AutoProcessor.from_pretrained(model_path)
        self.tokenizer = self.processor.tokenizer
        # Prompts are processed in parallel (tokenizer and image processor release the GIL for most of it):
        # the first batch's processing is time the GPU waits.
        self.encoding_threads = min(8, len(os.sched_getaffinity(0)))  # its CPUs (Slurm's, or its pool share)
        self._encoders = ThreadPoolExecutor(max_workers=self.encoding_threads, thread_name_prefix="encode")
        self._fits: OrderedDict[tuple, tuple[Image.Image, Image.Image]] = OrderedDict()  # see fit_image
        self._fits_lock = threading.Lock()
        self.packed = PackedGenerator(self.model, prefill_tokens or (
            memory.PREFILL_TOKENS if self.device.type == "cuda" else memory.CPU_PREFILL_TOKENS))

    @property
    def device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return "cpu"

    def sampling(self, generation: dict) -> Sampling | None:
        """The packed loop's settings, or None when only HF generate can honour ``generation``."""
        return Sampling.from_settings(self.model.generation_config, generation)

    def batch_budget(self, generation: dict, longest_prompt: int, total_gib: float | None = None) -> tuple[int, bool]:
        """(tokens per batch, padded?): K/V cache tokens (prompt + new) a packed batch may hold, after the
        weights and the prefill's activations, in 90% of the card (or of ``total_gib``); HF generate's
        padded budget otherwise."""
        total_gib = total_gib or self.total_gib
        if self.sampling(generation) is None:
            return memory.default_batch_tokens(self.device, total_gib), True
        if self.device.type != "cuda":
            return memory.CPU_PACKED_TOKENS, False
        return max(self._cache_tokens(total_gib, longest_prompt), 8192), False

    def _cache_tokens(self, total_gib: float | None, longest_prompt: int) -> int:
        total_gib = total_gib or self.total_gib or memory.card_gib(self.device)
        return memory.cache_tokens(self.model, total_gib, self.packed.prefill_tokens, longest_prompt)

    def token_budget(self, generation: dict, total_gib: float | None = None, requested: int | None = None) -> int:
        """Prompt tokens one task may have before it is truncated: ``requested`` (--token-budget) or what
        the card holds for one prompt (the packed engine prefills long prompts in pieces, so only the
        cache grows with the prompt), and never more than the model's context less the new tokens."""
        sampling = self.sampling(generation)
        if requested:
            card = requested
        elif sampling is None or self.device.type != "cuda":
            card = memory.default_token_budget(self.device)
        else:
            card = max(self._cache_tokens(total_gib, 1 << 62) - sampling.max_new_tokens, 1024)
        return min(card, self.context_tokens - self.max_new_tokens(generation))

    @property
    def context_tokens(self) -> int:
        """Positions the model has (Qwen3-VL-8B: 262,144)."""
        return int(self.model.config.text_config.max_position_embeddings)

    def max_new_tokens(self, generation: dict) -> int:
        value = generation.get("max_new_tokens", self.model.generation_config.max_new_tokens)
        return int(value or 0)

    def stream_batches(self, items: list[T], prepare: Callable[[T], Request], failed: Callable[[T, Exception], None],
                       generation: dict, batch_tokens: int | None = None, total_gib: float | None = None
                       ) -> "BatchStream[T]":
        """The items' batches as their prompts become ready (see BatchStream), each within ``batch_tokens`` or
        what the card holds."""
        budget, padded = self.batch_budget(generation, self.token_budget(generation, total_gib), total_gib)
        return BatchStream(self, items, prepare, failed, batch_tokens or budget, padded, generation)

    def _shares(self, sharing: Sharing, request: Request) -> tuple[int, int] | None:
        """What the generator will take for this prompt from an earlier one of its batch (the same rule)."""
        if not self.packed.share_prefixes or request.prompt is None:
            return None
        return sharing.add(request.prompt)

    def prepare(self, text: str, image: Image.Image | None, generation: dict, budget: int,
                table: TokenizedTable | None = None, share_key: object = None, suffix_room: int = 0,
                max_input_tokens: int | None = None) -> Request:
        """A request with its prompt ids made, within ``budget`` tokens. ``text`` holds ``TABLE_SLOT``
        where ``table`` goes; the table is cut to fit (see tables.py) and its ids are composed from its
        one tokenisation. The cut leaves room after the table for ``suffix_room`` tokens if that is more
        than this prompt's own (``suffix_tokens``): tasks that differ only after the table (one table and
        question type) then cut it alike, and with equal ``share_key`` the generator prefills their common
        beginning once. Raises PromptTooLong when even the prompt around the table does not fit.
        With ``max_input_tokens`` the table is cut by the users' own rule instead (``cut_as_users``: their text
        message's tokens, the image not counted); a prompt that still exceeds ``budget`` raises PromptTooLong."""
        if table is None or TABLE_SLOT not in text:
            request = Request(text.replace(TABLE_SLOT, ""), image, generation)
            request.prompt = self._prompt(request)
            request.prompt.share_key = share_key
            request.prompt_tokens = request.extras["full_tokens"] = request.prompt.length
            if request.prompt_tokens > budget:
                raise PromptTooLong(request.prompt_tokens, budget)
            return request
        rendered = self._render(Request(text, image, generation))
        prefix, suffix = rendered.split(TABLE_SLOT)
        image_inputs = self._image_inputs(image)
        prefix = self._expand_image(prefix, image_inputs)
        suffix_tokens = len(self._tokens(suffix))
        full = len(self._tokens(prefix)) + suffix_tokens + table.tokens
        if max_input_tokens:
            text_prefix, text_suffix = self._render(Request(text, None, generation)).split(TABLE_SLOT)
            cut = table.cut_as_users(max_input_tokens, lambda c: len(self._compose(text_prefix, c, text_suffix)))
            ids = self._compose(prefix, cut, suffix)
            if len(ids) > budget:
                raise PromptTooLong(full, budget)
            return self._table_request(text, image, generation, ids, full, cut, image_inputs, share_key)
        around = full - table.tokens + max(suffix_room - suffix_tokens, 0)
        room = budget - around - JOIN_SLACK
        for _ in range(3):  # the joins can differ from the parts by a token or two: shrink and compose again
            if room < 0:
                raise PromptTooLong(full, budget)
            cut = table.cut(room, lambda marker: len(self._tokens(marker)))
            ids = self._compose(prefix, cut, suffix)
            if len(ids) <= budget:
                break
            room -= len(ids) - budget
        else:
            raise PromptTooLong(full, budget)
        return self._table_request(text, image, generation, ids, full, cut, image_inputs, share_key)

    def _table_request(self, text: str, image, generation: dict, ids: list[int], full: int, cut: TableCut,
                       image_inputs: dict, share_key: object) -> Request:
        request = Request(text.replace(TABLE_SLOT, cut.text()), image, generation, prompt_tokens=len(ids),
                          extras={"full_tokens": full}, cut=cut)
        request.prompt = self._prompt_from_ids(ids, image_inputs)
        request.prompt.share_key = share_key
        return request

    def suffix_tokens(self, text: str, image: Image.Image | None) -> int:
        """Tokens of the prompt after ``TABLE_SLOT`` (the question and the chat template's end): what
        ``prepare``'s ``suffix_room`` is counted in."""
        if TABLE_SLOT not in text:
            return 0
        return len(self._tokens(self._render(Request(text, image, {})).split(TABLE_SLOT)[1]))

    def _tokens(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _render(self, request: Request) -> str:
        return self.processor.apply_chat_template(self._conversation(request), tokenize=False,
                                                  add_generation_prompt=True)

    def fit_image(self, image: Image.Image, min_pixels: int | None, max_pixels: int | None) -> Image.Image:
        """The image as the processor resizes it for the model (the users' runs: the processor's own sizing
        rule with the variant's limits, bicubic with antialias on 8-bit values, straight from the original
        size). The result is 8-bit again, so the pixel values the model gets equal theirs. The processor
        reads the pixels through a read-only view (no copy of a 233 MP image): nothing writes to it. The last
        few fits are remembered (with their originals, so an id is never reused while its entry lives)."""
        low, high = pixel_limits(min_pixels, max_pixels)
        key = (id(image), low, high)
        with self._fits_lock:
            if key in self._fits:
                self._fits.move_to_end(key)
                return self._fits[key][1]
        processor = self.processor.image_processor
        pixels = torch.from_numpy(np.asarray(image)).permute(2, 0, 1)[None]
        resized = processor.resize(pixels, size=SizeDict(shortest_edge=low, longest_edge=high),
                                   resample=processor.resample, factor=processor.patch_size * processor.merge_size)
        fitted = Image.fromarray(resized[0].permute(1, 2, 0).numpy())
        with self._fits_lock:
            self._fits[key] = (image, fitted)
            while len(self._fits) > FITS_KEPT:
                self._fits.popitem(last=False)
        return fitted

    def _image_inputs(self, image: Image.Image | None) -> dict:
        """The image processor's output for a fitted image (patches and grid), as the processor makes it."""
        if image is None:
            return {}
        return dict(self.processor.image_processor(images=[image], do_resize=False, return_tensors="pt"))

    def _expand_image(self, text: str, image_inputs: dict) -> str:
        """The image placeholder as the processor expands it: one pad token per merged patch."""
        if not image_inputs:
            return text
        merge = self.processor.image_processor.merge_size ** 2
        pad = self.processor.image_token
        return text.replace(pad, pad * int(image_inputs["image_grid_thw"][0].prod() // merge), 1)

    def _compose(self, prefix: str, cut: TableCut, suffix: str) -> list[int]:
        """The prompt's ids: the table's own token runs as they are, everything between them (the prompt
        around the table, markers, lines cut in two) tokenised where it joins."""
        ids: list[int] = []
        window: list[str] = []
        for piece in [prefix, *cut.segments(), suffix]:
            if isinstance(piece, str):
                window.append(piece)
                continue
            ids += self._tokens("".join(window))
            window = []
            ids += cut.table.ids[piece[0]:piece[1]].tolist()
        return ids + self._tokens("".join(window))

    def _prompt_from_ids(self, ids: list[int], image_inputs: dict) -> Prompt:
        input_ids = torch.tensor(ids, dtype=torch.long)
        token_types = (input_ids == self.processor.image_token_id).long()
        grid = image_inputs.get("image_grid_thw")
        positions, _ = self.model.model.get_rope_index(input_ids[None], token_types[None], image_grid_thw=grid)
        pixels = image_inputs.get("pixel_values")
        return Prompt(self._pinned(input_ids), self._pinned(positions[:, 0]),
                      None if pixels is None else self._pinned(pixels), grid)

    def _conversation(self, request: Request) -> list[dict]:
        content = [{"type": "image", "image": request.image}] if request.image is not None else []
        content.append({"type": "text", "text": request.text})
        return [{"role": "user", "content": content}]

    def _process(self, requests: list[Request], **kwargs) -> dict:
        """The processor's inputs for whole prompts; their images are fitted already (``fit_image``)."""
        texts = [self._render(r) for r in requests]
        images = [r.image for r in requests if r.image is not None] or None
        return self.processor(text=texts, images=images, return_tensors="pt", do_resize=False, **kwargs)

    def _pinned(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.pin_memory() if self.device.type == "cuda" else tensor

    def encode(self, requests: list[Request]) -> Encoded:
        """The processor's work for one batch (CPU): chat template, images, tokens, rope positions."""
        generation = dict(requests[0].generation)
        sampling = self.sampling(generation)
        if sampling is None:  # HF generate (padded.py)
            inputs = self._process(requests, padding=True, padding_side="left")
            inputs = {k: self._pinned(v) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
            return Encoded(generation, int(inputs["attention_mask"].sum()), padded=inputs)
        prompts = list(self._encoders.map(lambda r: r.prompt or self._prompt(r), requests))
        return Encoded(generation, sum(p.length for p in prompts), prompts=prompts, sampling=sampling)

    def _prompt(self, request: Request) -> Prompt:
        inputs = self._process([request])
        positions, _ = self.model.model.get_rope_index(
            inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs.get("image_grid_thw"))
        pixels, grid = inputs.get("pixel_values"), inputs.get("image_grid_thw")
        return Prompt(self._pinned(inputs["input_ids"][0]), self._pinned(positions[:, 0]),
                      None if pixels is None else self._pinned(pixels), grid)

    def generate_ids(self, encoded: Encoded) -> list[list[int]]:
        """New token ids per request; raises torch.OutOfMemoryError as is (the caller splits)."""
        if encoded.prompts is not None:
            return self.packed.generate(encoded.prompts, encoded.sampling)
        return padded.generate(self.model, encoded.padded, encoded.generation)

    def generate_encoded(self, encoded: Encoded) -> list[str]:
        """Generate for an encoded batch; raises torch.OutOfMemoryError as is (the caller splits)."""
        return self.tokenizer.batch_decode(self.generate_ids(encoded), skip_special_tokens=True)

    def free_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
