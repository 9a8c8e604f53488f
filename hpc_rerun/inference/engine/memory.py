"""How much of the card a batch and one prompt may take: the K/V cache beside the weights and the prefill's
activations (packed), or HF generate's padded batches, from measured figures (docs/performance.md)."""

from __future__ import annotations

import torch

from ...pixels import MAX_IMAGE_TOKENS

GPU_MEMORY_ENV = "HPC_RERUN_GPU_MEMORY_GIB"  # plan (and hold the allocator to) a card of this many GiB
# Packed generation: prompts per prefill pass on a GPU (long enough for efficient matrix products,
# short enough that the activations stay small), and the bytes of activations per prefill token
# (Qwen3-VL-8B, bf16: the MLP's four 12288-wide rows dominate; checked against measured peaks).
PREFILL_TOKENS = 16384
ACTIVATION_BYTES_PER_TOKEN = 160 * 1024
CPU_PREFILL_TOKENS = CPU_PACKED_TOKENS = 32768
CACHE_SHARE = 0.90  # of the card: weights, activations and the K/V cache of a packed batch
# Measured (docs/performance.md, docs/facts.md): 200K prompt tokens fit in 80 GB
# beside the 8B weights (16.3 GiB); the budget scales with the memory left after the weights.
MEASURED_TOKENS, MEASURED_GIB, WEIGHTS_GIB = 200_000, 80, 17
# Measured with Qwen3-VL-8B, bf16, 128 new tokens (docs/performance.md, H200, 2026-11-27): peak
# 41.6 GiB at 98K padded prompt tokens per batch, 82.7 GiB at 290K: ~20.6 GiB + 0.214 GiB per 1K tokens.
BATCH_BASE_GIB, BATCH_GIB_PER_1K_TOKENS = 20.6, 0.214


def card_gib(device: torch.device) -> float:
    return torch.cuda.get_device_properties(device).total_memory / 1024**3


def hold_allocator(device: torch.device, total_gib: float) -> None:
    """Hold PyTorch's allocator to ``total_gib`` (a shared or MIG'd card, or a run planned for a smaller one),
    less what the CUDA context already takes: its cache then stays inside too."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    allowed = total_gib * 1024**3 - (total - free)
    torch.cuda.set_per_process_memory_fraction(max(min(allowed / total, 1.0), 0.0), index)


def default_batch_tokens(device: torch.device, total_gib: float | None = None) -> int:
    """Padded prompt tokens per HF generate call: what fits in 85% of the card's memory (or ``total_gib``)
    by the measured model above; a small batch on a CPU."""
    if device.type != "cuda":
        return 8192
    total_gib = total_gib or card_gib(device)
    return max(8192, int((0.85 * total_gib - BATCH_BASE_GIB) / BATCH_GIB_PER_1K_TOKENS * 1000))


def default_token_budget(device: torch.device) -> int:
    """Prompt tokens one task may have before it is truncated, for HF generate (padded batches, whole
    prompts) and CPUs; the packed engine computes its own (``cache_tokens``)."""
    if device.type != "cuda":
        return 32_768  # CPU runs are for tiny models and tests: long prompts would take hours
    scale = max(card_gib(device) - WEIGHTS_GIB, 1) / (MEASURED_GIB - WEIGHTS_GIB)
    return int(MEASURED_TOKENS * scale)


def kv_bytes_per_token(text_config, dtype: torch.dtype) -> int:
    size = torch.tensor([], dtype=dtype).element_size()
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    return text_config.num_hidden_layers * 2 * text_config.num_key_value_heads * head_dim * size


def cache_tokens(model, total_gib: float, prefill_tokens: int, longest_prompt: int) -> int:
    """K/V cache tokens that fit in 90% of the card beside the weights and the activations of the largest
    prefill pass (``prefill_tokens``, or more when a piece is stretched to hold an image)."""
    weights = torch.cuda.memory_allocated(model.device)
    largest_pass = max(prefill_tokens, min(longest_prompt, prefill_tokens + MAX_IMAGE_TOKENS))
    free = CACHE_SHARE * total_gib * 1024**3 - weights - ACTIVATION_BYTES_PER_TOKEN * largest_pass
    return int(free // kv_bytes_per_token(model.config.text_config, model.dtype))
