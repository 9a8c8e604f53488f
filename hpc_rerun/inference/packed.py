"""Packed generation: prompts without padding, one K/V pool, variable-length attention.

Why: a left-padded batch pays for its padding in every matrix product, forces a masked attention
kernel (no flash), and HF's DynamicCache copies the whole cache at every step (docs/performance.md).
Here each sequence owns a contiguous region of one preallocated K/V pool: prefill packs prompts into
one row (long ones in pieces), decode sends one token per sequence, and attention reads each region in place
(flash-attention's varlen kernel on a GPU, a per-sequence SDPA loop elsewhere). The model's own
modules do everything else; only the attention function is swapped, for the duration of a call.

Prompts that begin alike (tasks of one configuration, table and question type: every token up to the
question) share those keys: the first such prompt of a batch is prefilled whole, the others only from where
they differ, attending to its region for the rest, and their regions hold only their own keys.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

ATTENTION = "hpc_rerun_packed"
# Generation settings the packed loop implements, as HF generate applies them.
IMPLEMENTED = {"do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "max_new_tokens",
               "min_new_tokens"}
# Settings that never change which tokens come out: ids the loop reads, HF's own cache, what generate returns.
NO_EFFECT = {"bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "transformers_version",
             "use_cache", "cache_implementation", "cache_config", "max_cache_len", "compile_config", "disable_compile",
             "output_attentions", "output_hidden_states", "output_scores", "output_logits", "return_dict_in_generate",
             "low_memory", "max_length", "prefill_chunk_size"}
BEAM_ONLY = {"length_penalty", "early_stopping"}  # shape beam scores; nothing with one beam
DONE_CHECK_EVERY = 8  # decode steps between host checks for "all finished" (each check syncs)
KEY_PIECE = 2048  # keys per piece of decode attention (KeySplit) ...
MAX_KEY_PIECES = 64  # ... and at most this many pieces per sequence (longer pieces beyond 128K keys)
SHARE_MIN_TOKENS = 1024  # a common beginning shorter than this is prefilled again (not worth a second pass)


@dataclass
class Prompt:
    """One request, tokenized: ids, 3-D rope positions, its image's patches (CPU, pinned on GPU hosts)."""

    input_ids: torch.Tensor  # [L]
    positions: torch.Tensor  # [3, L]
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None  # [1, 3]
    share_key: object = None  # prompts with equal keys may begin alike (checked token by token: Sharing)

    @property
    def length(self) -> int:
        return self.input_ids.shape[0]

    @property
    def next_position(self) -> int:
        return int(self.positions.max()) + 1


@dataclass
class Sampling:
    """The generation settings the packed loop understands (merged with the model's own defaults)."""

    max_new_tokens: int
    min_new_tokens: int
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    eos_token_ids: list[int]
    pad_token_id: int
    min_p: float | None = None
    repetition_penalty: float = 1.0
    _eos: torch.Tensor | None = field(default=None, repr=False)

    @classmethod
    def from_settings(cls, model_defaults, generation: dict) -> Sampling | None:
        """Merge like HF generate does (the model's generation_config, then the call's settings); None
        when the result needs something only HF generate does (beams, n-gram bans, ...).

        A setting at its no-op value (``repetition_penalty`` 1.0, as Qwen3-VL ships it; one beam) is no
        reason to leave the packed loop: only settings that change the tokens count."""
        from transformers import GenerationConfig

        merged = copy.deepcopy(model_defaults) if model_defaults is not None else GenerationConfig()
        unknown = merged.update(**generation)
        defaults = GenerationConfig._get_default_generation_params()  # what generate() fills in when unset

        def setting(name):
            value = getattr(merged, name, None)
            return defaults.get(name) if value is None else value

        def changes_tokens(name) -> bool:
            if name in IMPLEMENTED or name in NO_EFFECT or (name in BEAM_ONLY and setting("num_beams") == 1):
                return False
            value = getattr(merged, name, None)
            return value is not None and value != defaults.get(name)

        needs_generate = sorted(set(unknown or ()) | {k for k in merged.to_diff_dict() if changes_tokens(k)})
        if needs_generate or merged.max_new_tokens is None:
            _say_fallback(tuple(needs_generate) or ("max_new_tokens unset",))
            return None
        eos = merged.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        pad = merged.pad_token_id if merged.pad_token_id is not None else (eos[0] if eos else 0)
        return cls(max_new_tokens=int(merged.max_new_tokens), min_new_tokens=int(merged.min_new_tokens or 0),
                   do_sample=bool(setting("do_sample")), temperature=float(setting("temperature")),
                   top_k=int(setting("top_k") or 0), top_p=float(setting("top_p")),
                   eos_token_ids=eos, pad_token_id=pad, min_p=merged.min_p,
                   repetition_penalty=float(setting("repetition_penalty")))

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1.0

    def seen_tokens(self, prompts: list[Prompt], vocab_size: int, device) -> torch.Tensor | None:
        """[n, vocab] True where a sequence's ids (prompt, then generated) hold the token: what
        ``repetition_penalty`` applies to, as HF does over the whole input_ids. None without a penalty."""
        if not self.penalised:
            return None
        seen = torch.zeros(len(prompts), vocab_size, dtype=torch.bool, device=device)
        rows = torch.cat([torch.full((p.length,), i, dtype=torch.long) for i, p in enumerate(prompts)])
        ids = torch.cat([p.input_ids for p in prompts])
        seen[rows.to(device), ids.to(device)] = True
        return seen

    def pick(self, logits: torch.Tensor, produced: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
        """Next token per row, as HF's greedy/sampling would choose it: its logits processors in its
        order (repetition penalty, min_new_tokens), then its warpers (temperature, top-k, top-p, min-p).

        ``produced`` (tokens generated so far) and ``seen`` are device tensors, so a CUDA graph can
        replay this."""
        logits = logits.float()
        if seen is not None:
            logits = torch.where(seen, torch.where(logits < 0, logits * self.repetition_penalty,
                                                   logits / self.repetition_penalty), logits)
        if self.min_new_tokens and self.eos_token_ids:
            if self._eos is None:  # made once, at prefill: a CUDA graph cannot copy from the host
                self._eos = torch.tensor(self.eos_token_ids, device=logits.device)
            eos = self._eos
            logits[:, eos] = torch.where(produced < self.min_new_tokens, float("-inf"), logits[:, eos])
        if not self.do_sample:
            return logits.argmax(-1)
        if self.temperature != 1.0:
            logits = logits / self.temperature
        if self.top_k:
            kth = torch.topk(logits, min(self.top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1.0:
            ordered, order = torch.sort(logits, descending=False)
            cumulative = ordered.softmax(-1).cumsum(-1)
            drop = cumulative <= 1 - self.top_p
            drop[:, -1] = False
            logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
        if self.min_p is not None:
            probs = logits.softmax(-1)
            drop = probs < self.min_p * probs.amax(-1, keepdim=True)
            drop.scatter_(-1, probs.argmax(-1, keepdim=True), False)
            logits = logits.masked_fill(drop, float("-inf"))
        # torch.multinomial's own way for one sample (the same draws for the same seed), without its
        # host-side validity check: that check syncs every step and cannot be captured in a CUDA graph.
        probs = logits.softmax(-1)
        return (probs / torch.empty_like(probs).exponential_()).argmax(-1)


@functools.cache
def _say_fallback(settings: tuple[str, ...]) -> None:
    log.warning("generation settings %s need HF generate: batches are padded (slower)", ", ".join(settings))


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


def shared_prefix(a: Prompt, b: Prompt, image_token_id: int) -> int:
    """How many first tokens ``b`` can take from ``a``: equal ids (and, over an image, the same picture),
    leaving ``b`` at least one token of its own (its first answer token comes from its last one)."""
    n = min(a.length, b.length) - 1
    if n <= 0:
        return 0
    differ = (a.input_ids[:n] != b.input_ids[:n]).nonzero()
    keys = int(differ[0]) if len(differ) else n
    same_image = (a.pixel_values is not None and b.pixel_values is not None
                  and torch.equal(a.image_grid_thw, b.image_grid_thw) and torch.equal(a.pixel_values, b.pixel_values))
    if not same_image:  # image pad tokens are equal ids whatever the picture: share only what comes before
        for prompt in (a, b):
            where = (prompt.input_ids[:keys] == image_token_id).nonzero()
            if len(where):
                keys = int(where[0])
    return keys


class Sharing:
    """Which prompts of a batch take their beginning from an earlier one: the first prompt of a share key is
    prefilled whole, a later one with the same key from where its ids differ (if the common part is long
    enough to be worth it). The batch planner and the generator ask the same way, so they agree."""

    def __init__(self, image_token_id: int):
        self.image_token_id = image_token_id
        self.first: dict[object, int] = {}
        self.prompts: list[Prompt] = []

    def add(self, prompt: Prompt) -> tuple[int, int] | None:
        """(index of the prompt it shares with, keys shared) or None; ``prompt`` gets the next index."""
        index = len(self.prompts)
        self.prompts.append(prompt)
        if prompt.share_key is None:
            return None
        source = self.first.setdefault(prompt.share_key, index)
        if source == index:
            return None
        keys = shared_prefix(self.prompts[source], prompt, self.image_token_id)
        return (source, keys) if keys >= SHARE_MIN_TOKENS else None


def flash_available(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and _flash_agrees(device, dtype)


@functools.cache
def _flash_agrees(device: torch.device, dtype: torch.dtype) -> bool:
    """Once per process: the varlen kernel on this torch build against the SDPA loop, on a prefill (a
    whole prompt and a later piece of one: causal masks aligned to the last key), a prefill of prompts that
    share their beginning with another, and a decode over key pieces (one sequence with a shared
    beginning), in pool regions that do not start at 0. A build without the kernel (or with another
    alignment) falls back to the loop with a warning instead of giving wrong answers."""
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        pool = torch.randn(2, 64, 2, 128, generator=gen, device=device, dtype=dtype)
        cases = [  # decode?, new tokens, keys in the own region, shared beginning (pool row, keys) or None
            (False, [5, 4], [5, 12], None),
            (False, [4, 3], [4, 6], ([30, 30], [9, 17])),  # two sequences sharing with one: equal rows
            (True, [1, 1], [7, 30], ([40, 0], [17, 0]))]
        for decode, lengths, used, shared in cases:
            cu = [0, lengths[0], sum(lengths)]
            starts = [3, 20, 64]
            device_starts = torch.tensor(starts, dtype=torch.int32, device=device)
            device_used = torch.tensor(used, dtype=torch.int32, device=device)
            layout = Layout(pool=pool, slots=torch.empty(0, device=device),
                            cu_q=torch.tensor(cu, dtype=torch.int32, device=device), starts=device_starts,
                            used=device_used, max_q=max(lengths), max_k=max(used), host_cu_q=cu,
                            host_starts=starts, host_used=used)
            if shared:
                layout.host_shared_starts, layout.host_shared_used = shared
            if decode:  # pieces of 8 keys: a shared beginning of 3 pieces (the last partial), 1 and 4 own ones
                layout.split = KeySplit(starts[:-1], 40, shared[0], shared[1], 8, pool.shape[1], device)
                layout.split.update(device_used + torch.tensor(shared[1], dtype=torch.int32, device=device))
            elif shared:
                layout.shared_starts = torch.tensor(shared[0] + [64], dtype=torch.int32, device=device)
                layout.shared_used = torch.tensor(shared[1], dtype=torch.int32, device=device)
                layout.max_shared = max(shared[1])
            q = torch.randn(cu[-1], 8, 128, generator=gen, device=device, dtype=dtype)
            fast = _flash(q, pool[0], pool[1], layout, causal=not decode, scale=128**-0.5)
            slow = _reference(q, pool[0], pool[1], layout, 128**-0.5)
            error = ((fast.float() - slow.float()).norm() / slow.float().norm()).item()
            if not error < 1e-2:
                what = "decode" if decode else "shared prefill" if shared else "prefill"
                raise ValueError(f"relative error {error:.3g} against SDPA ({what})")
        return True
    except Exception as err:  # noqa: BLE001 - any failure means: do not use it
        log.warning("flash-attention varlen kernel not used (%s: %s); attention runs per sequence with SDPA",
                    type(err).__name__, err)
        return False


LONG_PREFILL_KEYS = 8192  # a lone sequence attending to this many keys or more: the split kernel, if faster


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


def _lone_layout(pool, start: int, queries: int, keys: int) -> Layout:
    device = pool.device
    return Layout(pool=pool, slots=torch.empty(0, device=device),
                  cu_q=torch.tensor([0, queries], dtype=torch.int32, device=device),
                  starts=torch.tensor([start, start + keys], dtype=torch.int32, device=device),
                  used=torch.tensor([keys], dtype=torch.int32, device=device), max_q=queries, max_k=keys,
                  host_cu_q=[0, queries], host_starts=[start, start + keys], host_used=[keys])


@functools.cache
def long_prefill_kernel(device: torch.device, dtype: torch.dtype) -> str:
    """Once per process (the engine asks at load, before any cache exists): "cudnn" if the split kernel
    agrees with the SDPA loop and prefills a long piece faster than flash-attention's varlen kernel on
    this card, else "flash". Measured, not assumed: on an H200 cuDNN ran 570-580 TFLOP/s against 332-346
    (docs/performance.md); other cards decide for themselves. The agreement is checked on a small case
    (the loop's masked SDPA materialises its scores), the speed on a long one."""
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        scale = 128**-0.5
        attend = functools.partial(cudnn_attend, scale=scale)
        pool = torch.randn(2, 6000, 8, 128, generator=gen, device=device, dtype=dtype)
        q = torch.randn(512, 32, 128, generator=gen, device=device, dtype=dtype)
        split = split_prefill(q, pool[0], pool[1], 100, 4608, attend).float()
        slow = _reference(q, pool[0], pool[1], _lone_layout(pool, 100, 512, 4608), scale).float()
        error = ((split - slow).norm() / slow.norm()).item()
        if not error < 1e-2:
            raise ValueError(f"relative error {error:.3g} against SDPA")
        pool = torch.randn(2, 40_000, 8, 128, generator=gen, device=device, dtype=dtype)
        q = torch.randn(4096, 32, 128, generator=gen, device=device, dtype=dtype)
        start, keys = 1000, 36_864
        layout = _lone_layout(pool, start, 4096, keys)

        def seconds(fn) -> float:
            fn()
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(3):
                fn()
            end.record()
            torch.cuda.synchronize(device)
            return begin.elapsed_time(end)

        flash = seconds(lambda: _flash(q, pool[0], pool[1], layout, True, scale)) if _flash_agrees(device, dtype) \
            else float("inf")
        cudnn = seconds(lambda: split_prefill(q, pool[0], pool[1], start, keys, attend))
        chosen = "cudnn" if cudnn < flash else "flash"
        log.info("long prefill pieces: %s (cuDNN split %.1f ms, flash varlen %.1f ms)", chosen, cudnn, flash)
        return chosen
    except Exception as err:  # noqa: BLE001 - any failure means: do not use it
        log.info("long prefill pieces: flash varlen (cuDNN split not usable: %s: %s)", type(err).__name__, err)
        return "flash"


def _flash(q, k, v, layout: Layout, causal: bool, scale: float) -> torch.Tensor:
    """flash-attention's varlen kernel reading the pool in place; ``seqused_k`` bounds each region. With
    shared beginnings: their keys without a mask, the own region's causally, merged by log-sum-exp."""
    if layout.split is not None:
        return _flash_decode(q, k, v, layout.split, scale)
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


def _flash_decode(q, k, v, split: KeySplit, scale: float) -> torch.Tensor:
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


def _reference(q, k, v, layout: Layout, scale: float) -> torch.Tensor:
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


def packed_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, packed: Layout = None,
                     **kwargs):
    """Registered with transformers as ``ATTENTION``: write the new K/V into the pool, attend in place."""
    layout = packed
    pool = layout.pool[module.layer_idx]
    pool[0].index_copy_(0, layout.slots, key[0].transpose(0, 1))
    pool[1].index_copy_(0, layout.slots, value[0].transpose(0, 1))
    q = query[0].transpose(0, 1)  # [T, heads, dim]
    lone_long = (len(layout.host_cu_q) == 2 and layout.max_q > 1 and layout.host_used is not None
                 and layout.host_used[0] >= LONG_PREFILL_KEYS and layout.shared_used is None)
    if flash_available(q.device, q.dtype) and lone_long and long_prefill_kernel(q.device, q.dtype) == "cudnn":
        out = split_prefill(q, pool[0], pool[1], layout.host_starts[0], layout.host_used[0],
                            functools.partial(cudnn_attend, scale=scaling))
    elif flash_available(q.device, q.dtype):
        out = _flash(q, pool[0], pool[1], layout, causal=layout.max_q > 1, scale=scaling)
    else:
        out = _reference(q, pool[0], pool[1], layout, scaling)
    return out.unsqueeze(0), None


def register() -> None:
    from transformers import AttentionInterface

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


def kv_bytes_per_token(text_config, dtype: torch.dtype) -> int:
    size = torch.tensor([], dtype=dtype).element_size()
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    return text_config.num_hidden_layers * 2 * text_config.num_key_value_heads * head_dim * size


def fill(items: list, size, budget: int, padded: bool = False, most: int | None = None) -> list[list]:
    """Consecutive groups in the given order, each within ``budget`` tokens: summed, or padded (every
    item as long as the newest, so give padded groups in increasing size), at most ``most`` items."""
    groups, current, total = [], [], 0
    for item in items:
        tokens = size(item)
        cost = (len(current) + 1) * tokens if padded else total + tokens
        if current and (cost > budget or (most is not None and len(current) >= most)):
            groups.append(current)
            current, total = [], 0
        current.append(item)
        total += tokens
    if current:
        groups.append(current)
    return groups


@dataclass
class Piece:
    """Tokens ``begin:end`` of prompt ``index``, prefilled in one pass (a long prompt takes several)."""

    index: int
    begin: int
    end: int

    @property
    def tokens(self) -> int:
        return self.end - self.begin


def prompt_pieces(index: int, begin: int, length: int, piece_tokens: int, image_span: tuple[int, int] | None
                  ) -> list[Piece]:
    """Cut tokens ``begin:length`` of a prompt into pieces of at most ``piece_tokens``, never inside its
    image's tokens (the vision tower's output goes in whole): a piece that would end inside the image ends
    after it."""
    pieces = []
    while begin < length:
        end = min(begin + piece_tokens, length)
        if image_span is not None and image_span[0] < end < image_span[1]:
            end = image_span[1]
        pieces.append(Piece(index, begin, end))
        begin = end
    return pieces


def prefill_passes(prompts: list[tuple[int, int, int, tuple[int, int] | None]], pass_tokens: int) -> list[list[Piece]]:
    """Prompts (index, first token to prefill, length, image span) in order, long ones in pieces, packed
    into forward passes of about ``pass_tokens``."""
    pieces = [piece for index, begin, length, span in prompts
              for piece in prompt_pieces(index, begin, length, pass_tokens, span)]
    return fill(pieces, lambda piece: piece.tokens, pass_tokens)


class PackedGenerator:
    """Prefill in packed passes, then decode every sequence together, one token each per step."""

    def __init__(self, model, prefill_tokens: int, cuda_graphs: bool = True, share_prefixes: bool = True):
        register()
        if flash_available(model.device, model.dtype):  # choose kernels now, while no K/V cache holds the card
            long_prefill_kernel(model.device, model.dtype)
            torch.cuda.empty_cache()
        self.cuda_graphs = cuda_graphs
        self.share_prefixes = share_prefixes
        self.stats = {"prompt_tokens": 0, "shared_tokens": 0}  # prefill work asked for, and taken from others
        self.model = model
        self.text_config = model.config.text_config
        self.device = model.device
        self.dtype = model.dtype
        self.prefill_tokens = prefill_tokens
        cfg = self.text_config
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.pool_shape = (cfg.num_hidden_layers, 2, None, cfg.num_key_value_heads, self.head_dim)

    def _forward(self, ids, positions, layout: Layout, logits_to_keep, pixel_values=None, grid=None):
        return self.model(input_ids=ids[None], position_ids=positions[:, None], pixel_values=pixel_values,
                          image_grid_thw=grid, use_cache=False, logits_to_keep=logits_to_keep,
                          packed=layout).logits[0]

    @torch.inference_mode()
    def generate(self, prompts: list[Prompt], sampling: Sampling) -> list[list[int]]:
        """New token ids per prompt (up to and including its end-of-sequence token).

        Prompts that share a beginning with an earlier one (``Sharing``) are prefilled in a second phase,
        from where they differ, once the prompts they share with are in the pool."""
        device, n = self.device, len(prompts)
        lengths = [p.length for p in prompts]
        sharing = Sharing(self.model.config.image_token_id)
        shares = [sharing.add(p) for p in prompts] if self.share_prefixes else [None] * n
        skipped = [share[1] if share else 0 for share in shares]  # tokens a prompt takes from another's region
        starts = [0]
        for length, skip in zip(lengths, skipped):
            starts.append(starts[-1] + length - skip + sampling.max_new_tokens)
        shared_starts = [starts[share[0]] if share else 0 for share in shares]
        shape = list(self.pool_shape)
        shape[2] = starts[-1]
        pool = torch.empty(shape, dtype=self.dtype, device=device)
        tokens = torch.full((n, sampling.max_new_tokens), sampling.pad_token_id, dtype=torch.long, device=device)
        spans = [self.image_span(p) for p in prompts]
        seen = sampling.seen_tokens(prompts, self.text_config.vocab_size, device)
        self.stats["prompt_tokens"] += sum(lengths)
        self.stats["shared_tokens"] += sum(skipped)
        with packed_attention_for(self.text_config):
            for second in (False, True):
                phase = [(i, skipped[i], lengths[i], spans[i]) for i in range(n) if (shares[i] is not None) == second]
                for pieces in prefill_passes(phase, self.prefill_tokens):
                    finished = [piece.index for piece in pieces if piece.end == lengths[piece.index]]
                    first = self._prefill(prompts, spans, pieces, finished, starts, skipped,
                                          shared_starts if second else None, pool, sampling, seen)
                    if finished:
                        tokens[finished, 0] = first
                        if seen is not None:
                            seen[finished, first] = True
            self._decode(prompts, lengths, skipped, starts, shared_starts, pool, tokens, sampling, seen)
        rows = tokens.tolist()
        eos = set(sampling.eos_token_ids)
        out = []
        for row in rows:
            end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
            out.append(row[:end])
        return out

    def image_span(self, prompt: Prompt) -> tuple[int, int] | None:
        """Where the image's tokens are in the prompt (one image per prompt at most)."""
        if prompt.pixel_values is None:
            return None
        where = (prompt.input_ids == self.model.config.image_token_id).nonzero()
        return int(where[0]), int(where[-1]) + 1

    def _prefill(self, prompts, spans, pieces: list[Piece], finished: list[int], starts, skipped, shared_starts,
                 pool, sampling, seen) -> torch.Tensor | None:
        """One forward pass over ``pieces``; the first new token of each ``finished`` prompt (those
        whose last piece this is), None when there are none. A prompt's region holds its keys from
        ``skipped`` on; with ``shared_starts`` (the second phase) the keys before that are another's."""
        device = self.device
        cu = [0]
        for piece in pieces:
            cu.append(cu[-1] + piece.tokens)
        region = [starts[piece.index] for piece in pieces]
        used = [piece.end - skipped[piece.index] for piece in pieces]  # own keys: earlier pieces' and this one's
        region.append(region[-1] + used[-1])
        slots = torch.cat([torch.arange(starts[p.index] + p.begin - skipped[p.index],
                                        starts[p.index] + p.end - skipped[p.index]) for p in pieces])
        layout = Layout(
            pool=pool, slots=slots.to(device, non_blocking=True),
            cu_q=torch.tensor(cu, dtype=torch.int32).to(device, non_blocking=True),
            starts=torch.tensor(region, dtype=torch.int32).to(device, non_blocking=True),
            used=torch.tensor(used, dtype=torch.int32).to(device, non_blocking=True),
            max_q=max(p.tokens for p in pieces), max_k=max(used), host_cu_q=cu, host_starts=region,
            host_used=used)
        if shared_starts is not None:
            first = [shared_starts[p.index] for p in pieces]
            shared = [skipped[p.index] for p in pieces]
            layout.host_shared_starts, layout.host_shared_used, layout.max_shared = first, shared, max(shared)
            layout.shared_starts = torch.tensor(first + [first[-1] + shared[-1]], dtype=torch.int32).to(
                device, non_blocking=True)
            layout.shared_used = torch.tensor(shared, dtype=torch.int32).to(device, non_blocking=True)
        ids = torch.cat([prompts[p.index].input_ids[p.begin:p.end] for p in pieces]).to(device, non_blocking=True)
        positions = torch.cat([prompts[p.index].positions[:, p.begin:p.end] for p in pieces], dim=1)
        with_image = [prompts[p.index] for p in pieces if spans[p.index] and p.begin <= spans[p.index][0] < p.end]
        pixels = grid = None
        if with_image:
            pixels = torch.cat([p.pixel_values for p in with_image]).to(device, non_blocking=True)
            grid = torch.cat([p.image_grid_thw for p in with_image]).to(device, non_blocking=True)
        last = [end - 1 for piece, end in zip(pieces, cu[1:]) if piece.end == prompts[piece.index].length]
        keep = torch.tensor(last or [cu[-1] - 1], dtype=torch.long).to(device, non_blocking=True)
        logits = self._forward(ids, positions.to(device, non_blocking=True), layout, keep, pixels, grid)
        if not finished:
            return None
        return sampling.pick(logits, torch.zeros((), dtype=torch.long, device=device),
                             None if seen is None else seen[finished])

    def _decode(self, prompts, lengths, skipped, starts, shared_starts, pool, tokens, sampling, seen) -> None:
        """One token per sequence per step, all in place on device tensors; on a GPU the step is replayed
        as a CUDA graph (one launch instead of some 700 kernels from Python)."""
        device, n = self.device, len(prompts)
        eos = torch.tensor(sampling.eos_token_ids or [-1], device=device)
        region = torch.tensor(starts, dtype=torch.int32, device=device)
        own = [length - skip for length, skip in zip(lengths, skipped)]
        length = torch.tensor(own, dtype=torch.int32, device=device)  # keys in each region
        shared = torch.tensor(skipped, dtype=torch.int32, device=device)
        position = torch.tensor([p.next_position for p in prompts], dtype=torch.long, device=device)
        produced = torch.ones((), dtype=torch.long, device=device)
        current = tokens[:, 0].clone()
        done = torch.isin(current, eos)
        slots = torch.empty(n, dtype=torch.long, device=device)
        used = torch.empty(n, dtype=torch.int32, device=device)
        keys = torch.empty(n, dtype=torch.int32, device=device)
        one = torch.ones((), dtype=torch.int32, device=device)
        pad = torch.full((), sampling.pad_token_id, dtype=torch.long, device=device)
        max_k = max(lengths) + sampling.max_new_tokens
        size = max(KEY_PIECE, -(-max_k // MAX_KEY_PIECES))
        layout = Layout(pool=pool, slots=slots, cu_q=torch.arange(n + 1, dtype=torch.int32, device=device),
                        starts=region, used=used, max_q=1, max_k=max(own) + sampling.max_new_tokens,
                        host_cu_q=list(range(n + 1)), host_starts=starts, host_used=None,
                        split=KeySplit(starts[:-1], max(own) + sampling.max_new_tokens, shared_starts, skipped, size,
                                       starts[-1], device),
                        host_shared_starts=shared_starts, host_shared_used=skipped)

        def step() -> None:
            torch.add(region[:-1], length, out=slots)
            length.add_(1)
            # A finished sequence keeps its place in the batch but attends to one key: nearly free.
            torch.where(done, one, length, out=used)
            torch.add(length, shared, out=keys)
            torch.where(done, one, keys, out=keys)
            layout.split.update(keys)
            logits = self._forward(current, position.expand(3, n), layout, 0)
            torch.where(done, pad, sampling.pick(logits, produced, seen), out=current)
            if seen is not None:
                seen.scatter_(1, current[:, None], True)
            done.logical_or_(torch.isin(current, eos))
            position.add_(1)
            produced.add_(1)

        graph = None
        for number in range(1, sampling.max_new_tokens):
            if number % DONE_CHECK_EVERY == 0 and bool(done.all()):
                break
            if graph is not None:
                graph.replay()
            elif self.cuda_graphs and device.type == "cuda" and number == 1:
                graph = self._capture(step)  # runs this step once, then records it
            else:
                step()
            tokens[:, number] = current

    def _capture(self, step) -> torch.cuda.CUDAGraph | None:
        """Run one decode step on a side stream (the warm-up a capture needs: lazy handles and
        workspaces), then record it on that stream. A step that cannot be captured decodes eagerly."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: the encoding thread may pin memory meanwhile, which a global capture forbids
            with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
                step()
        except Exception as err:  # noqa: BLE001 - capture is an optimisation; eager decoding is correct
            log.warning("decoding without CUDA graphs: the step could not be captured (%s: %s)",
                        type(err).__name__, err)
            self.cuda_graphs = False
            return None
        return graph
