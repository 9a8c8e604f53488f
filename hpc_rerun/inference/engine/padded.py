"""HF ``generate`` on left-padded batches: the fallback for generation settings the packed loop does not
implement (beams, n-gram bans, ...; named in the log when chosen, sampling.py). Slower: every matrix product
pays for the padding, and attention needs a mask."""

from __future__ import annotations

import torch

MAX_BATCH = 64  # rows per padded batch


def generate(model, inputs: dict, generation: dict) -> list[list[int]]:
    """New token ids per row of a padded batch (the processor's output, on the host)."""
    inputs = {k: v.to(model.device, non_blocking=True) if hasattr(v, "to") else v for k, v in inputs.items()}
    with torch.inference_mode():
        out = model.generate(**inputs, **generation)
    return out[:, inputs["input_ids"].shape[1]:].tolist()
