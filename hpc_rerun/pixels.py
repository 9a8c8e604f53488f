"""Qwen3-VL's image sizing: the pixel limits and the visual tokens an image becomes.

The worker resizes with qwen_vl_utils' ``smart_resize`` (inference/engine.py); planning runs on login nodes
without torch, which qwen_vl_utils and transformers' image processor import, so the same rule is written
out here for the planner (tests/test_costs.py checks it against qwen_vl_utils over many sizes).
"""

from __future__ import annotations

import math

TOKEN_PIXELS = 32  # one visual token per 32x32 px after the 2x2 merge
DEFAULT_MAX_PIXELS = 16384 * TOKEN_PIXELS**2  # the processor's own limit (~16.8M px)
MAX_IMAGE_TOKENS = DEFAULT_MAX_PIXELS // TOKEN_PIXELS**2
DEFAULT_MIN_PIXELS = 4 * TOKEN_PIXELS**2


def resized(height: int, width: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) as the processor feeds them: multiples of 32 px, inside the limits, same aspect."""
    factor = TOKEN_PIXELS
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def visual_tokens(width: int, height: int, min_pixels: int | None, max_pixels: int | None) -> int:
    """The tokens an image of this size becomes under a variant's limits (None: the processor's own)."""
    max_pixels = max_pixels or DEFAULT_MAX_PIXELS
    min_pixels = min(min_pixels or DEFAULT_MIN_PIXELS, max_pixels)
    h, w = resized(height, width, min_pixels, max_pixels)
    return (h // TOKEN_PIXELS) * (w // TOKEN_PIXELS)
