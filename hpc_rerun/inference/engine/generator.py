"""The packed generator: prompts without padding, one K/V pool, variable-length attention.

Why: a left-padded batch pays for its padding in every matrix product, forces a masked attention kernel
(no flash), and HF's DynamicCache copies the whole cache at every step (docs/performance.md). Here prefill
packs prompts into one row (long ones in pieces), decode sends one token per sequence, and each step of
decode replays as a CUDA graph on a GPU. Prompts that begin alike (tasks of one configuration, table and
question type: every token up to the question) share those keys: the first such prompt of a batch is
prefilled whole, the others only from where they differ, attending to its region for the rest.
"""

from __future__ import annotations

import logging

import torch

from .attention import Layout, packed_attention_for
from .kernels import select_attention
from .sampling import Sampling
from .sequences import Piece, Prompt, Sharing, prefill_passes

log = logging.getLogger(__name__)

DONE_CHECK_EVERY = 8  # decode steps between host checks for "all finished" (each check syncs)
KEY_PIECE = 2048  # keys per piece of decode attention (KeySplit) ...
MAX_KEY_PIECES = 64  # ... and at most this many pieces per sequence (longer pieces beyond 128K keys)


class PackedGenerator:
    """Prefill in packed passes, then decode every sequence together, one token each per step."""

    def __init__(self, model, prefill_tokens: int, cuda_graphs: bool = True, share_prefixes: bool = True):
        self.attention = select_attention(model.device, model.dtype)  # now, while no K/V cache holds the card
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
        shared = None
        if shared_starts is not None:
            shared = [shared_starts[p.index] for p in pieces], [skipped[p.index] for p in pieces]
        layout = Layout.prefill(pool, cu, region, used, slots, shared, self.attention)
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
        own = [length - skip for length, skip in zip(lengths, skipped)]
        length = torch.tensor(own, dtype=torch.int32, device=device)  # keys in each region
        shared = torch.tensor(skipped, dtype=torch.int32, device=device)
        position = torch.tensor([p.next_position for p in prompts], dtype=torch.long, device=device)
        produced = torch.ones((), dtype=torch.long, device=device)
        current = tokens[:, 0].clone()
        done = torch.isin(current, eos)
        keys = torch.empty(n, dtype=torch.int32, device=device)
        one = torch.ones((), dtype=torch.int32, device=device)
        pad = torch.full((), sampling.pad_token_id, dtype=torch.long, device=device)
        piece = max(KEY_PIECE, -(-(max(lengths) + sampling.max_new_tokens) // MAX_KEY_PIECES))
        layout = Layout.decode(pool, starts, max(own) + sampling.max_new_tokens, shared_starts, skipped,
                               torch.empty(n, dtype=torch.long, device=device),
                               torch.empty(n, dtype=torch.int32, device=device), piece, self.attention)
        region, slots, used = layout.starts, layout.slots, layout.used

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
