"""Which attention this card runs, decided once when the engine loads (before any K/V cache holds the card):
checked against the SDPA loop and, for long prefill pieces, timed. Measured, not assumed: a torch build
without the kernel, or with another alignment, gets the loop with a warning instead of wrong answers."""

from __future__ import annotations

import functools
import logging

import torch

from .attention import (
    Attention,
    FlashAttention,
    FlashWithCudnnLongPrefill,
    Layout,
    cudnn_attend,
    flash_varlen,
    sdpa_loop,
    split_prefill,
)

log = logging.getLogger(__name__)


def select_attention(device: torch.device, dtype: torch.dtype) -> Attention:
    """The fastest attention that agrees with the SDPA loop on this card."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16) or not flash_agrees(device, dtype):
        return Attention()
    chosen = FlashWithCudnnLongPrefill() if cudnn_prefills_faster(device, dtype) else FlashAttention()
    torch.cuda.empty_cache()
    return chosen


def relative_error(fast: torch.Tensor, slow: torch.Tensor) -> float:
    return ((fast.float() - slow.float()).norm() / slow.float().norm()).item()


@functools.cache
def flash_agrees(device: torch.device, dtype: torch.dtype) -> bool:
    """Once per process: the varlen kernel on this torch build against the SDPA loop, on a prefill (a
    whole prompt and a later piece of one: causal masks aligned to the last key), a prefill of prompts that
    share their beginning with another, and a decode over key pieces (one sequence with a shared
    beginning), in pool regions that do not start at 0."""
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        pool = torch.randn(2, 64, 2, 128, generator=gen, device=device, dtype=dtype)
        nothing = torch.empty(0, dtype=torch.long, device=device)
        region = [3, 20, 64]
        cases = {  # two sequences each, pool regions from rows 3 and 20
            "prefill": Layout.prefill(pool, [0, 5, 9], region, [5, 12], nothing),
            # both take their beginning from one sequence: equal rows
            "shared prefill": Layout.prefill(pool, [0, 4, 7], region, [4, 6], nothing, shared=([30, 30], [9, 17])),
        }
        used = torch.tensor([7, 30], dtype=torch.int32, device=device)
        decode = Layout.decode(pool, region, 40, [40, 0], [17, 0], nothing, used, 8)  # pieces of 8 keys
        decode.split.update(used + torch.tensor([17, 0], dtype=torch.int32, device=device))
        cases["decode"] = decode
        for what, layout in cases.items():
            q = torch.randn(layout.host_cu_q[-1], 8, 128, generator=gen, device=device, dtype=dtype)
            fast = flash_varlen(q, pool[0], pool[1], layout, causal=layout.max_q > 1, scale=128**-0.5)
            error = relative_error(fast, sdpa_loop(q, pool[0], pool[1], layout, 128**-0.5))
            if not error < 1e-2:
                raise ValueError(f"relative error {error:.3g} against SDPA ({what})")
        return True
    except Exception as err:  # noqa: BLE001 - any failure means: do not use it
        log.warning("flash-attention varlen kernel not used (%s: %s); attention runs per sequence with SDPA",
                    type(err).__name__, err)
        return False


@functools.cache
def cudnn_prefills_faster(device: torch.device, dtype: torch.dtype) -> bool:
    """Once per process: True if the split kernel (``split_prefill`` on cuDNN) agrees with the SDPA loop and
    prefills a long piece faster than flash-attention's varlen kernel on this card. On an H200 cuDNN ran
    570-580 TFLOP/s against 332-346 (docs/performance.md); other cards decide for themselves. The agreement
    is checked on a small case (the loop's masked SDPA materialises its scores), the speed on a long one."""
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        scale = 128**-0.5
        attend = functools.partial(cudnn_attend, scale=scale)
        pool = torch.randn(2, 6000, 8, 128, generator=gen, device=device, dtype=dtype)
        q = torch.randn(512, 32, 128, generator=gen, device=device, dtype=dtype)
        split = split_prefill(q, pool[0], pool[1], 100, 4608, attend)
        error = relative_error(split, sdpa_loop(q, pool[0], pool[1], Layout.lone(pool, 100, 512, 4608), scale))
        if not error < 1e-2:
            raise ValueError(f"relative error {error:.3g} against SDPA")
        pool = torch.randn(2, 40_000, 8, 128, generator=gen, device=device, dtype=dtype)
        q = torch.randn(4096, 32, 128, generator=gen, device=device, dtype=dtype)
        start, keys = 1000, 36_864
        layout = Layout.lone(pool, start, 4096, keys)

        def seconds(fn) -> float:
            fn()
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(3):
                fn()
            end.record()
            torch.cuda.synchronize(device)
            return begin.elapsed_time(end)

        flash = seconds(lambda: flash_varlen(q, pool[0], pool[1], layout, True, scale))
        cudnn = seconds(lambda: split_prefill(q, pool[0], pool[1], start, keys, attend))
        log.info("long prefill pieces: %s (cuDNN split %.1f ms, flash varlen %.1f ms)",
                 "cudnn" if cudnn < flash else "flash", cudnn, flash)
        return cudnn < flash
    except Exception as err:  # noqa: BLE001 - any failure means: do not use it
        log.info("long prefill pieces: flash varlen (cuDNN split not usable: %s: %s)", type(err).__name__, err)
        return False
