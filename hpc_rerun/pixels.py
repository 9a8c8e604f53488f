"""Qwen3-VL's image sizing: the pixel limits and the visual tokens an image becomes.

The worker resizes with the model's own image processor (``Engine.fit_image``), as the users' runs did;
planning runs on login nodes without torch, which transformers' image processor imports, so its sizing
rule (transformers' ``smart_resize`` for Qwen2-VL/Qwen3-VL) is written out here for the planner
(tests/test_costs.py checks it against the processor over many sizes).
"""

from __future__ import annotations

import math

TOKEN_PIXELS = 32  # one visual token per 32x32 px after the 2x2 merge of 16 px patches
# Qwen3-VL-8B-Instruct's preprocessor_config.json: size {shortest_edge: 65536, longest_edge: 16777216}.
DEFAULT_MAX_PIXELS = 16384 * TOKEN_PIXELS**2
DEFAULT_MIN_PIXELS = 64 * TOKEN_PIXELS**2
MAX_IMAGE_TOKENS = DEFAULT_MAX_PIXELS // TOKEN_PIXELS**2
# How far the worker shrinks an image that runs out of memory or fills the prompt budget: 4 visual tokens.
SMALLEST_IMAGE_PIXELS = 4 * TOKEN_PIXELS**2


def resized(height: int, width: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) as the processor feeds them: multiples of 32 px, inside the limits, same aspect.

    The processor refuses images whose sides differ more than 200-fold; the worker turns those away as bad
    input, the planner just counts them."""
    factor = TOKEN_PIXELS
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def pixel_limits(min_pixels: int | None, max_pixels: int | None) -> tuple[int, int]:
    """(min, max) pixels under a variant's settings (None: the processor's own); a cap below the minimum
    (a shrunk image) lowers the minimum with it, or the processor would enlarge the image again."""
    max_pixels = max_pixels or DEFAULT_MAX_PIXELS
    return min(min_pixels or DEFAULT_MIN_PIXELS, max_pixels), max_pixels


def visual_tokens(width: int, height: int, min_pixels: int | None, max_pixels: int | None) -> int:
    """The tokens an image of this size becomes under a variant's limits (None: the processor's own)."""
    h, w = resized(height, width, *pixel_limits(min_pixels, max_pixels))
    return (h // TOKEN_PIXELS) * (w // TOKEN_PIXELS)
