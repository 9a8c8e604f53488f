"""The model backend: Qwen3-VL through transformers + qwen-vl-utils, loaded once, batched generate.

Works the same for Qwen3-VL-8B-Instruct on a GPU and the tiny test model on a CPU.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator, TypeVar

import torch
from PIL import Image

from .packed import PackedGenerator, Prompt, Sampling, fill, kv_bytes_per_token

PATCH = 16  # Qwen3-VL vision patch size (qwen_vl_utils' default of 14 is Qwen2's)
TOKEN_PIXELS = 32  # one visual token per 32x32 px after the 2x2 merge
DEFAULT_MAX_PIXELS = 16384 * TOKEN_PIXELS**2  # the processor's own limit (~16.8M px)
MAX_IMAGE_TOKENS = DEFAULT_MAX_PIXELS // TOKEN_PIXELS**2
DEFAULT_MIN_PIXELS = 4 * TOKEN_PIXELS**2
# Measured (docs/performance.md, ../shared/notes/gpu-baseline.md): 200K prompt tokens fit in 80 GB
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


def plan_batches(items: list[T], tokens: Callable[[T], int], batch_tokens: int, padded: bool = True
                 ) -> list[list[T]]:
    """Similar lengths together: sort by tokens, fill each batch up to ``batch_tokens``, counted padded
    (every row as long as the longest) or packed (the sum)."""
    return fill(sorted(items, key=tokens), tokens, batch_tokens, padded, MAX_BATCH if padded else MAX_PACKED_BATCH)


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
    """One prompt ready for the model: text, optional image already fitted, generation settings."""

    text: str
    image: Image.Image | None
    generation: dict
    prompt_tokens: int = 0
    extras: dict = field(default_factory=dict)


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
        self._encoders = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="encode")
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
        if self.sampling(generation) is None:
            return default_batch_tokens(self.device, total_gib), True
        if self.device.type != "cuda":
            return CPU_PACKED_TOKENS, False
        return max(self._cache_tokens(total_gib, longest_prompt), 8192), False

    def _cache_tokens(self, total_gib: float | None, longest_prompt: int) -> int:
        """K/V cache tokens that fit in 90% of the card beside the weights and the activations of the
        largest prefill pass (``prefill_tokens``, or more when a piece is stretched to hold an image)."""
        if total_gib is None:
            total_gib = torch.cuda.get_device_properties(self.device).total_memory / 1024**3
        weights = torch.cuda.memory_allocated(self.device)
        largest_pass = max(self.packed.prefill_tokens, min(longest_prompt, self.packed.prefill_tokens + MAX_IMAGE_TOKENS))
        free = 0.90 * total_gib * 1024**3 - weights - ACTIVATION_BYTES_PER_TOKEN * largest_pass
        return int(free // kv_bytes_per_token(self.model.config.text_config, self.model.dtype))

    def token_budget(self, generation: dict, total_gib: float | None = None) -> int:
        """Prompt tokens one task may have before it is truncated: what the packed engine holds alone
        (long prompts are prefilled in pieces, so only the cache grows with the prompt)."""
        sampling = self.sampling(generation)
        if sampling is None or self.device.type != "cuda":
            return default_token_budget(self.device)
        return max(self._cache_tokens(total_gib, 1 << 62) - sampling.max_new_tokens, 1024)

    def plan(self, items: list[T], request_of: Callable[[T], Request], batch_tokens: int | None = None,
             total_gib: float | None = None) -> list[list[T]]:
        """Batches that fit the device: packed ones count prompt + new tokens, padded ones the padding."""
        if not items:
            return []
        generation = request_of(items[0]).generation
        budget, padded = self.batch_budget(generation, max(request_of(x).prompt_tokens for x in items), total_gib)
        new_tokens = 0 if padded else self.sampling(generation).max_new_tokens
        return plan_batches(items, lambda x: request_of(x).prompt_tokens + new_tokens, batch_tokens or budget,
                            padded=padded)

    def _conversation(self, request: Request) -> list[dict]:
        content = []
        if request.image is not None:
            w, h = request.image.size
            content.append({"type": "image", "image": request.image, "resized_height": h, "resized_width": w})
        content.append({"type": "text", "text": request.text})
        return [{"role": "user", "content": content}]

    def count_tokens(self, request: Request) -> int:
        """Prompt tokens: the chat-templated text plus one token per 32x32 px of the fitted image."""
        text = self.processor.apply_chat_template(self._conversation(request), tokenize=False,
                                                  add_generation_prompt=True)
        tokens = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if request.image is not None:
            w, h = request.image.size
            tokens += (w // TOKEN_PIXELS) * (h // TOKEN_PIXELS) - 1  # the placeholder becomes these
        return tokens

    def _process(self, requests: list[Request], **kwargs) -> dict:
        from qwen_vl_utils import process_vision_info

        conversations = [self._conversation(r) for r in requests]
        texts = [self.processor.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                 for c in conversations]
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
        prompts = list(self._encoders.map(self._prompt, requests))
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

    def pipelined(self, batches: list[list[T]], request_of: Callable[[T], Request]) -> Iterator[tuple[list[T], Encoded]]:
        """Yield each batch with its encoded inputs; the next batch is encoded on a CPU thread while
        the GPU generates the current one."""
        if not batches:
            return
        with ThreadPoolExecutor(max_workers=1) as pool:
            future = pool.submit(self.encode, [request_of(x) for x in batches[0]])
            for number, batch in enumerate(batches):
                encoded = future.result()
                if number + 1 < len(batches):
                    future = pool.submit(self.encode, [request_of(x) for x in batches[number + 1]])
                yield batch, encoded

    def free_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
