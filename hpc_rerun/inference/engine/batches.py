"""Batches as their prompts become ready: the engine's scheduler (one per shard run)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Generic, TypeVar

from . import padded as padded_generate
from .sequences import Sharing

if TYPE_CHECKING:
    from .core import Engine, Request

T = TypeVar("T")
MAX_PACKED_BATCH = 256  # sequences per packed batch
LOOKAHEAD_PER_THREAD = 2  # prompts prepared ahead of the GPU, per preparing thread (bounds host memory)


class BatchStream(Generic[T]):
    """Batches as their prompts become ready. ``prepare`` runs on the engine's encoding threads, a few items
    ahead and in the items' order, while the caller runs the batch before on the GPU; a batch closes when the
    next prompt would not fit it (prompt + new tokens of the cache budget, less what it shares with an earlier
    prompt of the batch; or padded rows for HF generate). An item whose prompt cannot be made goes to ``failed``
    and the rest go on. ``requeue`` takes an item back (a format re-ask): it is prepared again on the threads
    like any other and joins a later batch, so the batch that found it never waits for it."""

    def __init__(self, engine: "Engine", items: list[T], prepare: Callable[[T], Request],
                 failed: Callable[[T, Exception], None], budget: int, padded: bool, generation: dict):
        self.engine, self.prepare, self.failed, self.budget, self.padded = engine, prepare, failed, budget, padded
        self.new_tokens = 0 if padded else engine.sampling(generation).max_new_tokens
        self.most = padded_generate.MAX_BATCH if padded else MAX_PACKED_BATCH
        self.lookahead = LOOKAHEAD_PER_THREAD * engine.encoding_threads
        self.waiting: deque[T] = deque(items)
        self.pending: deque = deque()  # (item, future of its request), in order
        self._batches = self._run()

    def requeue(self, item: T) -> None:
        self.waiting.append(item)
        self._top_up()  # its prompt is made while the caller's next batch runs

    def __iter__(self) -> "BatchStream[T]":
        return self

    def __next__(self) -> list[T]:
        return next(self._batches)

    def _top_up(self) -> None:
        while self.waiting and len(self.pending) < self.lookahead:
            item = self.waiting.popleft()
            self.pending.append((item, self.engine._encoders.submit(self.prepare, item)))

    def _run(self) -> Iterator[list[T]]:
        engine, image_token = self.engine, self.engine.model.config.image_token_id
        self._top_up()
        batch, longest, total = [], 0, 0
        sharing = Sharing(image_token)
        while self.pending or batch:
            if not self.pending:  # nothing else is coming now: run what there is (a requeue may bring more)
                yield batch
                batch, longest, total = [], 0, 0
                sharing = Sharing(image_token)
                continue
            item, future = self.pending.popleft()
            self._top_up()
            try:
                request = future.result()
            except Exception as err:  # noqa: BLE001 - the item's own failure, reported by the caller
                self.failed(item, err)
                continue
            tokens = request.prompt_tokens + self.new_tokens
            share = None if self.padded else engine._shares(sharing, request)
            shared = share[1] if share else 0
            cost = (len(batch) + 1) * max(longest, tokens) if self.padded else total + tokens - shared
            if batch and (cost > self.budget or len(batch) >= self.most):
                yield batch
                batch, longest, total = [], 0, 0
                sharing = Sharing(image_token)
                share = None if self.padded else engine._shares(sharing, request)
            batch.append(item)
            longest, total = max(longest, tokens), total + tokens - (share[1] if share else 0)
