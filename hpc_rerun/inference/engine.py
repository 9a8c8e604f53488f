"""The model backend: Qwen3-VL through transformers + qwen-vl-utils, loaded once, batched generate.

Works the same for Qwen3-VL-8B-Instruct on a GPU and the tiny test model on a CPU.
"""

from __future__ import annotations

import math
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator, TypeVar

import torch
from PIL import Image

from ..pixels import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, MAX_IMAGE_TOKENS, TOKEN_PIXELS
from .packed import PackedGenerator, Prompt, Sampling, Sharing, kv_bytes_per_token
from .tables import TableCut, TokenizedTable

PATCH = 16  # Qwen3-VL vision patch size (qwen_vl_utils' default of 14 is Qwen2's)
# Measured (docs/performance.md, docs/facts.md): 200K prompt tokens fit in 80 GB
# beside the 8B weights (16.3 GiB); the budget scales with the memory left after the weights.
MEASURED_TOKENS, MEASURED_GIB, WEIGHTS_GIB = 200_000, 80, 17


T = TypeVar("T")
# Packed generation: prompts per prefill pass on a GPU (long enough for efficient matrix products,
# short enough that the activations stay small), and the bytes of activations per prefill token
# (Qwen3-VL-8B, bf16: the MLP's four 12288-wide rows dominate; checked against measured peaks).
PREFILL_TOKENS = 16384
ACTIVATION_BYTES_PER_TOKEN = 160 * 1024
CPU_PREFILL_TOKENS = CPU_PACKED_TOKENS = 32768
MAX_BATCH = 64
MAX_PACKED_BATCH = 256
LOOKAHEAD_PER_THREAD = 2  # prompts prepared ahead of the GPU, per preparing thread (bounds host memory)
GPU_MEMORY_ENV = "HPC_RERUN_GPU_MEMORY_GIB"
TABLE_SLOT = "\ue000table\ue000"  # where the table goes in a message (private-use characters)
JOIN_SLACK = 4  # tokens the joins around a table may differ from the parts counted alone


class PromptTooLong(ValueError):
    """A prompt that cannot be brought within its token budget (an image, or the text around a table)."""

    def __init__(self, full_tokens: int, budget: int):
        super().__init__(f"{full_tokens} prompt tokens, budget {budget}")
        self.full_tokens = full_tokens


# Measured with Qwen3-VL-8B, bf16, 128 new tokens (docs/performance.md, H200, 2026-11-27): peak
# 41.6 GiB at 98K padded prompt tokens per batch, 82.7 GiB at 290K: ~20.6 GiB + 0.214 GiB per 1K tokens.
BATCH_BASE_GIB, BATCH_GIB_PER_1K_TOKENS = 20.6, 0.214


def default_batch_tokens(device: torch.device, total_gib: float | None = None) -> int:
    """Padded prompt tokens per generate call: what fits in 85% of the card's memory (or ``total_gib``)
    by the measured model above; a small batch on a CPU."""
    if device.type != "cuda":
        return 8192
    if total_gib is None:
        total_gib = torch.cuda.get_device_properties(device).total_memory / 1024**3
    return max(8192, int((0.85 * total_gib - BATCH_BASE_GIB) / BATCH_GIB_PER_1K_TOKENS * 1000))


def default_token_budget(device: torch.device) -> int:
    """Prompt tokens one task may have before it is truncated, for HF generate (padded batches, whole
    prompts) and CPUs; the packed engine computes its own (Engine.token_budget)."""
    if device.type != "cuda":
        return 32_768  # CPU runs are for tiny models and tests: long prompts would take hours
    total_gib = torch.cuda.get_device_properties(device).total_memory / 1024**3
    scale = max(total_gib - WEIGHTS_GIB, 1) / (MEASURED_GIB - WEIGHTS_GIB)
    return int(MEASURED_TOKENS * scale)


def fit_image(image: Image.Image, min_pixels: int | None, max_pixels: int | None) -> Image.Image:
    """Resize to what the processor would feed the model (multiples of 32 px, inside the pixel limits).

    Huge images are first reduced in integer steps so nothing above the cap is ever passed on.
    """
    from qwen_vl_utils.vision_process import smart_resize

    max_pixels = max_pixels or DEFAULT_MAX_PIXELS
    min_pixels = min(min_pixels or DEFAULT_MIN_PIXELS, max_pixels)
    width, height = image.size
    if width * height > 4 * max_pixels:
        image = image.reduce(math.floor(math.sqrt(width * height / max_pixels)))
        width, height = image.size
    new_h, new_w = smart_resize(height, width, factor=TOKEN_PIXELS, min_pixels=min_pixels, max_pixels=max_pixels)
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    return image


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
        from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # Plan batches and prompt budgets as if the card had this much memory (a shared or MIG'd GPU), and hold
        # PyTorch's allocator to it, less what the CUDA context already takes: its cache then stays inside too.
        limit = os.environ.get(GPU_MEMORY_ENV)
        self.total_gib = float(limit) if limit else None
        if self.total_gib and self.device.type == "cuda":
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            free, total = torch.cuda.mem_get_info(index)
            allowed = self.total_gib * 1024**3 - (total - free)
            torch.cuda.set_per_process_memory_fraction(max(min(allowed / total, 1.0), 0.0), index)
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
        self.packed = PackedGenerator(self.model, prefill_tokens or (PREFILL_TOKENS if self.device.type == "cuda"
                                                                     else CPU_PREFILL_TOKENS))

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
            return default_batch_tokens(self.device, total_gib), True
        if self.device.type != "cuda":
            return CPU_PACKED_TOKENS, False
        return max(self._cache_tokens(total_gib, longest_prompt), 8192), False

    def _cache_tokens(self, total_gib: float | None, longest_prompt: int) -> int:
        """K/V cache tokens that fit in 90% of the card beside the weights and the activations of the
        largest prefill pass (``prefill_tokens``, or more when a piece is stretched to hold an image)."""
        total_gib = total_gib or self.total_gib or torch.cuda.get_device_properties(self.device).total_memory / 1024**3
        weights = torch.cuda.memory_allocated(self.device)
        largest_pass = max(self.packed.prefill_tokens, min(longest_prompt, self.packed.prefill_tokens + MAX_IMAGE_TOKENS))
        free = 0.90 * total_gib * 1024**3 - weights - ACTIVATION_BYTES_PER_TOKEN * largest_pass
        return int(free // kv_bytes_per_token(self.model.config.text_config, self.model.dtype))

    def token_budget(self, generation: dict, total_gib: float | None = None, requested: int | None = None) -> int:
        """Prompt tokens one task may have before it is truncated: ``requested`` (--token-budget) or what
        the card holds for one prompt (the packed engine prefills long prompts in pieces, so only the
        cache grows with the prompt), and never more than the model's context less the new tokens."""
        sampling = self.sampling(generation)
        if requested:
            card = requested
        elif sampling is None or self.device.type != "cuda":
            card = default_token_budget(self.device)
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
                       ) -> Iterator[list[T]]:
        """Batches as their prompts become ready. ``prepare`` runs on the encoding threads, a few items
        ahead and in the items' order, while the caller runs the batch before on the GPU; a batch closes
        when the next prompt would not fit it (prompt + new tokens of the cache budget, less what it shares
        with an earlier prompt of the batch; or padded rows for HF generate). An item whose prompt cannot be
        made goes to ``failed`` and the rest go on."""
        budget, padded = self.batch_budget(generation, self.token_budget(generation, total_gib), total_gib)
        budget = batch_tokens or budget
        new_tokens = 0 if padded else self.sampling(generation).max_new_tokens
        most = MAX_BATCH if padded else MAX_PACKED_BATCH
        lookahead = LOOKAHEAD_PER_THREAD * self.encoding_threads
        waiting, pending = deque(items), deque()

        def top_up() -> None:
            while waiting and len(pending) < lookahead:
                item = waiting.popleft()
                pending.append((item, self._encoders.submit(prepare, item)))

        top_up()
        batch, longest, total = [], 0, 0
        sharing = Sharing(self.model.config.image_token_id)
        while pending:
            item, future = pending.popleft()
            top_up()
            try:
                request = future.result()
            except Exception as err:  # noqa: BLE001 - the item's own failure, reported by the caller
                failed(item, err)
                continue
            tokens = request.prompt_tokens + new_tokens
            share = None if padded else self._shares(sharing, request)
            cost = (len(batch) + 1) * max(longest, tokens) if padded else total + tokens - (share[1] if share else 0)
            if batch and (cost > budget or len(batch) >= most):
                yield batch
                batch, longest, total = [], 0, 0
                sharing = Sharing(self.model.config.image_token_id)
                share = None if padded else self._shares(sharing, request)
            batch.append(item)
            longest, total = max(longest, tokens), total + tokens - (share[1] if share else 0)
        if batch:
            yield batch

    def _shares(self, sharing: Sharing, request: Request) -> tuple[int, int] | None:
        """What the generator will take for this prompt from an earlier one of its batch (the same rule)."""
        if not self.packed.share_prefixes or request.prompt is None:
            return None
        return sharing.add(request.prompt)

    def prepare(self, text: str, image: Image.Image | None, generation: dict, budget: int,
                table: TokenizedTable | None = None, share_key: object = None, suffix_room: int = 0) -> Request:
        """A request with its prompt ids made, within ``budget`` tokens. ``text`` holds ``TABLE_SLOT``
        where ``table`` goes; the table is cut to fit (see tables.py) and its ids are composed from its
        one tokenisation. The cut leaves room after the table for ``suffix_room`` tokens if that is more
        than this prompt's own (``suffix_tokens``): tasks that differ only after the table (one table and
        question type) then cut it alike, and with equal ``share_key`` the generator prefills their common
        beginning once. Raises PromptTooLong when even the prompt around the table does not fit."""
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

    def _image_inputs(self, image: Image.Image | None) -> dict:
        """The image processor's output for a fitted image (patches and grid), as the processor makes it."""
        if image is None:
            return {}
        from qwen_vl_utils import process_vision_info

        w, h = image.size
        images, _ = process_vision_info([{"role": "user", "content": [
            {"type": "image", "image": image, "resized_height": h, "resized_width": w}]}], image_patch_size=PATCH)
        return dict(self.processor.image_processor(images=images, do_resize=False, return_tensors="pt"))

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
        content = []
        if request.image is not None:
            w, h = request.image.size
            content.append({"type": "image", "image": request.image, "resized_height": h, "resized_width": w})
        content.append({"type": "text", "text": request.text})
        return [{"role": "user", "content": content}]

    def _process(self, requests: list[Request], **kwargs) -> dict:
        from qwen_vl_utils import process_vision_info

        conversations = [self._conversation(r) for r in requests]
        texts = [self._render(r) for r in requests]
        images, _, video_kwargs = process_vision_info(
            conversations, image_patch_size=PATCH, return_video_kwargs=True, return_video_metadata=True)
        return self.processor(text=texts, images=images, videos=None, return_tensors="pt", do_resize=False,
                              **video_kwargs, **kwargs)

    def _pinned(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.pin_memory() if self.device.type == "cuda" else tensor

    def encode(self, requests: list[Request]) -> Encoded:
        """The processor's work for one batch (CPU): chat template, images, tokens, rope positions."""
        generation = dict(requests[0].generation)
        sampling = self.sampling(generation)
        if sampling is None:
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
        inputs = {k: v.to(self.device, non_blocking=True) if hasattr(v, "to") else v
                  for k, v in encoded.padded.items()}
        with torch.inference_mode():
            out = self.model.generate(**inputs, **encoded.generation)
        return out[:, inputs["input_ids"].shape[1]:].tolist()

    def generate_encoded(self, encoded: Encoded) -> list[str]:
        """Generate for an encoded batch; raises torch.OutOfMemoryError as is (the caller splits)."""
        return self.tokenizer.batch_decode(self.generate_ids(encoded), skip_special_tokens=True)

    def generate(self, requests: list[Request]) -> list[str]:
        """One batch; all requests must share generation settings."""
        return self.generate_encoded(self.encode(requests))

    def free_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
