"""Deferring submitit's preemption signal to the worker's safe points (used by the job class and the worker).

submitit's answer to SIGUSR2 (Slurm's warning before the time limit, or a preemption) checkpoints, requeues
and exits, or raises when the element may not requeue again. Raised from wherever the worker happens to
be, that can land inside a library's broad ``except Exception`` (transformers' loading code, the worker's
own guard around one batch) and be swallowed, or be written down as a failed task. So while a shard runs the
signal is only noted, and submitit's handler runs at the worker's next ``safe_point``: after the model has
loaded and after each batch's records are written.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_noted: list[int] = []  # signals received since the last safe point
_handlers: dict[int, Callable] = {}  # submitit's handlers, run at the next safe point


def safe_point() -> None:
    """Where the worker may stop: a signal noted since the last one goes to submitit's handler now."""
    if _noted:
        signum = _noted[-1]
        _noted.clear()
        _handlers[signum](signum, None)


@contextmanager
def signals_at_safe_points() -> Iterator[None]:
    """Defer submitit's preemption signal (SUBMITIT_PREEMPT_SIGNAL, default USR2) to the safe points; a
    process without submitit's handler (``hpc-rerun worker`` by hand) keeps its own."""
    signum = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))
    handler = signal.getsignal(signum)
    if not callable(handler):
        yield
        return
    _handlers[signum] = handler
    signal.signal(signum, lambda number, frame: _noted.append(number))
    try:
        yield
    finally:
        signal.signal(signum, handler)
        _noted.clear()
