"""Attention over the packed K/V pool: where a pass's keys are (``Layout``, ``KeySplit``) and the ways to
compute it (``Attention`` and its faster kinds, one chosen per card at load: kernels.py).

Each sequence owns a contiguous region of one preallocated pool; attention reads the regions in place:
flash-attention's variable-length kernel on a GPU (a lone long prompt's pieces with cuDNN's dense kernel
where that is faster), a per-sequence SDPA loop elsewhere. Only the language model's attention function is
swapped, for the duration of a call; the model's own modules do everything else.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

ATTENTION = "hpc_rerun_packed"
LONG_PREFILL_KEYS = 8192  # a lone sequence attending to this many keys or more: the split kernel, if faster


@dataclass
class Layout:
    """Where one forward pass's new tokens go and what each sequence attends to.

    ``cu_q``: offsets of each sequence's new tokens in the packed row; ``starts``: each sequence's
    region in the pool (plus one end, as varlen kernels want); ``used``: keys each sequence attends to
    in its region after this pass's tokens are written. A sequence that shares its beginning with another
    attends first to ``shared_used`` keys from ``shared_starts`` (the other's region; prefill passes hold
    only such sequences, or none). Host copies serve the fallback loop without device syncs.
    """

    pool: torch.Tensor  # [layers, 2, capacity, kv_heads, head_dim]
    slots: torch.Tensor  # [T] pool row of each new token
    cu_q: torch.Tensor
    starts: torch.Tensor
    used: torch.Tensor
    max_q: int
    max_k: int
    host_cu_q: list[int]
    host_starts: list[int]
    host_used: list[int] | None  # None while decoding: read from ``used`` when needed
    split: KeySplit | None = None  # decoding: each sequence's keys in pieces
    shared_starts: torch.Tensor | None = None  # prefill of sequences that share a beginning (plus one end)
    shared_used: torch.Tensor | None = None
    max_shared: int = 0
    host_shared_starts: list[int] | None = None
    host_shared_used: list[int] | None = None
    attention: Attention | None = None  # how to compute it on this card (chosen once, at load)

    @classmethod
    def prefill(cls, pool: torch.Tensor, cu: list[int], region: list[int], used: list[int], slots: torch.Tensor,
                shared: tuple[list[int], list[int]] | None = None, attention: Attention | None = None) -> Layout:
        """A prefill pass: sequence b's new tokens are ``cu[b]:cu[b + 1]`` of the packed row, its region starts at
        pool row ``region[b]`` (``region`` ends with one end) and holds ``used[b]`` keys after the pass;
        ``shared``: (first pool row, keys) of each sequence's shared beginning, in another's region."""
        device = pool.device

        def on_device(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int32).to(device, non_blocking=True)

        layout = cls(pool=pool, slots=slots.to(device, non_blocking=True), cu_q=on_device(cu),
                     starts=on_device(region), used=on_device(used), max_q=max(b - a for a, b in zip(cu, cu[1:])),
                     max_k=max(used), host_cu_q=cu, host_starts=region, host_used=used, attention=attention)
        if shared is not None:
            first, keys = shared
            layout.host_shared_starts, layout.host_shared_used, layout.max_shared = first, keys, max(keys)
            layout.shared_starts = on_device(first + [first[-1] + keys[-1]])
            layout.shared_used = on_device(keys)
        return layout

    @classmethod
    def decode(cls, pool: torch.Tensor, starts: list[int], most_keys: int, shared_starts: list[int],
               shared_keys: list[int], slots: torch.Tensor, used: torch.Tensor, piece: int,
               attention: Attention | None = None) -> Layout:
        """A decode step: one query token per sequence, regions from ``starts`` (plus one end: the pool's
        rows), each sequence's own keys (at most ``most_keys``) after its shared beginning, read in pieces of
        ``piece`` keys. ``slots`` and ``used`` are filled in place at each step (a CUDA graph replays them)."""
        device, n = pool.device, len(starts) - 1
        return cls(pool=pool, slots=slots, cu_q=torch.arange(n + 1, dtype=torch.int32, device=device),
                   starts=torch.tensor(starts, dtype=torch.int32, device=device), used=used, max_q=1,
                   max_k=most_keys, host_cu_q=list(range(n + 1)), host_starts=starts, host_used=None,
                   split=KeySplit(starts[:-1], most_keys, shared_starts, shared_keys, piece, starts[-1], device),
                   host_shared_starts=shared_starts, host_shared_used=shared_keys, attention=attention)

    @classmethod
    def lone(cls, pool: torch.Tensor, start: int, queries: int, keys: int) -> Layout:
        """One sequence whose ``queries`` new tokens are the last of ``keys`` keys from pool row ``start``."""
        return cls.prefill(pool, [0, queries], [start, start + keys], [keys], torch.empty(0, dtype=torch.long))

    @property
    def lone_long(self) -> bool:
        """One sequence prefilling a piece against many keys of its own (what the cuDNN split is for)."""
        return (len(self.host_cu_q) == 2 and self.max_q > 1 and self.host_used is not None
                and self.host_used[0] >= LONG_PREFILL_KEYS and self.shared_used is None)


class KeySplit:
    """Decode attention over key pieces (flash-decoding), merged by their log-sum-exp.

    Why: at one query token per sequence the kernel gives each (sequence, K/V head) one thread block,
    so a 16K-token sequence is read by 8 blocks while the rest of the GPU idles. Cut into pieces of
    ``size`` keys, each piece is its own varlen entry and the reads spread over the whole chip. A shared
    beginning is simply more pieces (in the other sequence's region), ahead of the sequence's own. All
    tensors keep their shapes from step to step (a CUDA graph replays them); ``update`` refreshes them.
    """

    def __init__(self, own_starts: list[int], own_keys: int, shared_starts: list[int], shared_keys: list[int],
                 size: int, capacity: int, device):
        self.size = size
        rows = []  # per sequence: (pool row, first key of the piece in the sequence's order, most keys)
        for own, shared_start, shared in zip(own_starts, shared_starts, shared_keys):
            row = [(shared_start + b, b, min(size, shared - b)) for b in range(0, shared, size)]
            rows.append(row + [(own + b, shared + b, size) for b in range(0, own_keys, size)])
        self.pieces = max(len(row) for row in rows)
        rows = [row + [(capacity - 1, 1 << 30, 0)] * (self.pieces - len(row)) for row in rows]  # read nothing
        # A piece past its sequence's keys reads nothing (weight 0) but must still point into the pool.
        starts = [min(start, capacity - 1) for row in rows for start, _, _ in row]
        self.starts = torch.tensor(starts + starts[-1:], dtype=torch.int32, device=device)
        self.first = torch.tensor([[first for _, first, _ in row] for row in rows], dtype=torch.int32, device=device)
        self.most = torch.tensor([[most for _, _, most in row] for row in rows], dtype=torch.int32, device=device)
        self.used = torch.ones(len(rows) * self.pieces, dtype=torch.int32, device=device)
        self.valid = torch.ones(len(rows), self.pieces, dtype=torch.bool, device=device)

    def update(self, keys: torch.Tensor) -> None:
        """Keys per piece for sequences attending to ``keys`` keys in all (empty pieces read one, weighted 0)."""
        per_piece = torch.minimum((keys[:, None] - self.first).clamp_(min=0), self.most)
        torch.gt(per_piece, 0, out=self.valid)
        torch.clamp(per_piece.reshape(-1), min=1, out=self.used)


def split_prefill(q, k, v, start: int, keys: int, attend) -> torch.Tensor:
    """One sequence's prefill piece (its queries the last of ``keys`` keys from pool row ``start``) as two
    attentions merged by their log-sum-exp: the earlier keys without a mask, the piece's own causally.

    Why: without a mask the query heads that share a K/V head are simply more query rows, so the earlier
    keys (nearly all of them in a long prompt) are read in place from the pool, with no copy per query
    head, by the fastest dense kernel the card has (cuDNN's on Hopper); only the piece's own keys are
    repeated for the causal block. ``attend(q, k, v, causal) -> (out, lse)`` takes [1, heads, rows, dim]."""
    n, heads, dim = q.shape
    kv_heads = k.shape[1]
    group, earlier = heads // kv_heads, keys - n
    parts = []
    if earlier > 0:
        rows = q.view(n, kv_heads, group, dim).permute(1, 2, 0, 3).reshape(1, kv_heads, group * n, dim)
        out, lse = attend(rows, k[start:start + earlier].transpose(0, 1)[None],
                          v[start:start + earlier].transpose(0, 1)[None], False)
        parts.append((out.reshape(heads, n, dim), lse.reshape(heads, n)))
    own = slice(start + earlier, start + keys)
    out, lse = attend(q.transpose(0, 1)[None], k[own].transpose(0, 1).repeat_interleave(group, 0)[None],
                      v[own].transpose(0, 1).repeat_interleave(group, 0)[None], True)
    parts.append((out.reshape(heads, n, dim), lse.reshape(heads, n)))
    if len(parts) == 1:
        return parts[0][0].transpose(0, 1).to(q.dtype)
    weights = torch.softmax(torch.stack([lse for _, lse in parts]).float(), dim=0)
    merged = sum(w[..., None] * out.float() for w, (out, _) in zip(weights, parts))
    return merged.to(q.dtype).transpose(0, 1)


def cudnn_attend(q, k, v, causal: bool, scale: float):
    return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False,
                                                              scale=scale)[:2]


def flash_varlen(q, k, v, layout: Layout, causal: bool, scale: float) -> torch.Tensor:
    """flash-attention's varlen kernel reading the pool in place; ``seqused_k`` bounds each region. With
    shared beginnings: their keys without a mask, the own region's causally, merged by log-sum-exp."""
    if layout.split is not None:
        return flash_decode(q, k, v, layout.split, scale)
    q = q.contiguous()
    out, lse = torch.ops.aten._flash_attention_forward(
        q, k, v, layout.cu_q, layout.starts, layout.max_q, layout.max_k, 0.0, causal, False,
        scale=scale, seqused_k=layout.used)[:2]
    if layout.shared_used is None:
        return out
    shared, shared_lse = torch.ops.aten._flash_attention_forward(
        q, k, v, layout.cu_q, layout.shared_starts, layout.max_q, layout.max_shared, 0.0, False, False,
        scale=scale, seqused_k=layout.shared_used)[:2]
    if lse.dim() != 2:  # [heads, tokens] for varlen; older kernels padded it per sequence
        raise ValueError(f"log-sum-exp of shape {tuple(lse.shape)}")
    weights = torch.softmax(torch.stack([lse, shared_lse]).float(), dim=0).transpose(1, 2)[..., None]
    return (weights[0] * out.float() + weights[1] * shared.float()).to(q.dtype)


def flash_decode(q, k, v, split: KeySplit, scale: float) -> torch.Tensor:
    """One query token per sequence, over key pieces. The query heads sharing a K/V head go in as that
    head's query rows (each K/V piece is read once, not once per query head); the pieces' partial
    results are merged with their log-sum-exp, as flash-decoding does."""
    n, heads, dim = q.shape
    kv_heads = k.shape[1]
    group, pieces = heads // kv_heads, split.pieces
    rows = q.reshape(n, kv_heads, group, dim).transpose(1, 2)  # [n, group, kv_heads, dim]
    rows = rows[:, None].expand(n, pieces, group, kv_heads, dim).reshape(n * pieces * group, kv_heads, dim)
    cu_q = torch.arange(0, (n * pieces + 1) * group, group, dtype=torch.int32, device=q.device)
    out, lse = torch.ops.aten._flash_attention_forward(
        rows, k, v, cu_q, split.starts, group, split.size, 0.0, False, False, scale=scale,
        seqused_k=split.used)[:2]
    out = out.view(n, pieces, group, kv_heads, dim)
    if lse.dim() == 2:  # [kv_heads, total rows]
        lse = lse.view(kv_heads, n, pieces, group).permute(1, 2, 3, 0)
    else:  # [entries, kv_heads, rows per entry] (older kernels)
        lse = lse[..., :group].view(n, pieces, kv_heads, group).transpose(2, 3)
    lse = lse.masked_fill(~split.valid[:, :, None, None], float("-inf"))
    weights = (lse - lse.amax(1, keepdim=True)).exp_()  # [n, pieces, group, kv_heads]
    merged = (out.float() * weights[..., None]).sum(1) / weights.sum(1)[..., None]
    return merged.to(q.dtype).transpose(1, 2).reshape(n, heads, dim)


def sdpa_loop(q, k, v, layout: Layout, scale: float) -> torch.Tensor:
    """The same attention one sequence at a time with SDPA (CPUs, and GPUs without flash)."""
    used = layout.host_used if layout.host_used is not None else layout.used.tolist()
    shared = layout.host_shared_used or [0] * len(used)
    group = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    for b, (q0, q1) in enumerate(zip(layout.host_cu_q, layout.host_cu_q[1:])):
        rows = torch.arange(layout.host_starts[b], layout.host_starts[b] + used[b], device=q.device)
        if shared[b]:  # a shared beginning, then the sequence's own keys
            first = layout.host_shared_starts[b]
            rows = torch.cat([torch.arange(first, first + shared[b], device=q.device), rows])
        keys = k[rows].transpose(0, 1).repeat_interleave(group, dim=0)
        values = v[rows].transpose(0, 1).repeat_interleave(group, dim=0)
        query = q[q0:q1].transpose(0, 1)
        mask = None
        if q1 - q0 > 1:  # causal, the queries being the last keys
            offset = len(rows) - (q1 - q0)
            mask = torch.ones(q1 - q0, len(rows), dtype=torch.bool, device=q.device).tril(offset)
        out[q0:q1] = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale).transpose(0, 1)
    return out


class Attention:
    """The SDPA loop, one sequence at a time: right everywhere (CPUs, and GPUs without flash-attention)."""

    name = "sdpa-loop"

    def __call__(self, q, k, v, layout: Layout, scale: float) -> torch.Tensor:
        return sdpa_loop(q, k, v, layout, scale)


class FlashAttention(Attention):
    """flash-attention's variable-length kernel over the pool (prefill, shared beginnings, decode pieces)."""

    name = "flash-varlen"

    def __call__(self, q, k, v, layout: Layout, scale: float) -> torch.Tensor:
        return flash_varlen(q, k, v, layout, causal=layout.max_q > 1, scale=scale)


class FlashWithCudnnLongPrefill(FlashAttention):
    """As FlashAttention, but a lone long prompt's pieces go through ``split_prefill`` on cuDNN's kernel."""

    name = "flash-varlen + cudnn long prefill"

    def __call__(self, q, k, v, layout: Layout, scale: float) -> torch.Tensor:
        if layout.lone_long:
            return split_prefill(q, k, v, layout.host_starts[0], layout.host_used[0],
                                 functools.partial(cudnn_attend, scale=scale))
        return super().__call__(q, k, v, layout, scale)


def packed_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, packed: Layout = None,
                     **kwargs):
    """Registered with transformers as ``ATTENTION``: write the new K/V into the pool, attend in place."""
    pool = packed.pool[module.layer_idx]
    pool[0].index_copy_(0, packed.slots, key[0].transpose(0, 1))
    pool[1].index_copy_(0, packed.slots, value[0].transpose(0, 1))
    q = query[0].transpose(0, 1)  # [T, heads, dim]
    return packed.attention(q, pool[0], pool[1], packed, scaling).unsqueeze(0), None


AttentionInterface.register(ATTENTION, packed_attention)


@contextlib.contextmanager
def packed_attention_for(text_config):
    """Swap the language model's attention for the packed one; the vision tower keeps its own."""
    before = text_config._attn_implementation
    text_config._attn_implementation = ATTENTION
    try:
        yield
    finally:
        text_config._attn_implementation = before
