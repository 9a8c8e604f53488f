"""The split prefill kernel's arithmetic (stacked query heads, the causal block, the log-sum-exp merge) on a
CPU, with an exact attention standing in for cuDNN's: it must equal the per-sequence SDPA loop."""

from __future__ import annotations

import torch

from hpc_rerun.packed import Layout, _reference, split_prefill


def exact_attend(q, k, v, causal: bool, scale: float):
    """What cuDNN's kernel returns, computed plainly in float64: output and log-sum-exp per query row."""
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    if causal:
        rows, cols = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(rows, cols, dtype=torch.bool).triu(1 + cols - rows), float("-inf"))
    return (scores.softmax(-1) @ v.double()).to(q.dtype), scores.logsumexp(-1)


def test_split_prefill_equals_attention_over_the_whole_region():
    torch.manual_seed(0)
    heads, kv_heads, dim = 8, 2, 16
    pool = torch.randn(2, 200, kv_heads, dim)
    scale = dim**-0.5
    for start, keys, n in ((5, 90, 30), (17, 30, 30), (0, 150, 1 + 64)):  # a later piece, a first piece, odd sizes
        q = torch.randn(n, heads, dim)
        layout = Layout(pool=pool, slots=torch.empty(0), cu_q=torch.tensor([0, n]), starts=torch.tensor([start, start + keys]),
                        used=torch.tensor([keys]), max_q=n, max_k=keys, host_cu_q=[0, n],
                        host_starts=[start, start + keys], host_used=[keys])
        expected = _reference(q, pool[0], pool[1], layout, scale)
        got = split_prefill(q, pool[0], pool[1], start, keys, scale, lambda *a: exact_attend(*a, scale=scale))
        assert torch.allclose(got, expected, atol=1e-5), (start, keys, n, (got - expected).abs().max())
