"""The split prefill kernel's arithmetic (stacked query heads, the causal block, the log-sum-exp merge) on a
CPU, with an exact attention standing in for cuDNN's: it must equal the per-sequence SDPA loop."""

from __future__ import annotations

import torch

from hpc_rerun.inference.engine.attention import KeySplit, Layout, sdpa_loop, split_prefill


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
        expected = sdpa_loop(q, pool[0], pool[1], Layout.lone(pool, start, n, keys), scale)
        got = split_prefill(q, pool[0], pool[1], start, keys, lambda *a: exact_attend(*a, scale=scale))
        assert torch.allclose(got, expected, atol=1e-5), (start, keys, n, (got - expected).abs().max())


def test_decode_pieces_cover_a_shared_beginning_then_the_own_keys_exactly():
    """KeySplit's pieces, as the flash-decoding kernel reads them: for each sequence, the pool rows of its
    shared beginning (in another sequence's region) then its own, each row once, at every length."""
    size, capacity = 8, 200
    own_starts, shared_starts, shared_keys = [0, 60, 120], [0, 0, 0], [0, 21, 16]  # 2 and 3 share 1's first keys
    split = KeySplit(own_starts, 40, shared_starts, shared_keys, size, capacity, "cpu")
    for own in ([1, 1, 1], [9, 2, 17], [40, 40, 40]):
        split.update(torch.tensor([o + s for o, s in zip(own, shared_keys)], dtype=torch.int32))
        used = split.used.view(len(own), split.pieces)
        starts = split.starts[:-1].view(len(own), split.pieces)
        for n in range(len(own)):
            rows = [int(starts[n, p]) + r for p in range(split.pieces) if split.valid[n, p] for r in range(used[n, p])]
            expected = list(range(shared_starts[n], shared_starts[n] + shared_keys[n]))
            expected += list(range(own_starts[n], own_starts[n] + own[n]))
            assert rows == expected, (own, n)
            assert all(0 <= int(s) < capacity for s in starts[n])
