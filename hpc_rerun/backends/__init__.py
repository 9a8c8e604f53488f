"""Where shards run. One small protocol, two implementations (as submitit splits core/, slurm/, local/):

- ``slurm``: one job array per attempt through submitit (backends/slurm.py);
- ``local``: the same shards as processes on this machine, one per GPU (backends/local.py).

Every step that submits, asks for states or cancels goes through ``backend(name)``; nothing outside this
package branches on the executor.
"""

from __future__ import annotations

import datetime as dt
import shutil

from ..rundir import Attempt
from .base import ACTIVE, EXECUTORS, GRACE_S, AlreadySubmitted, Backend, BackendUnavailable, ElementState, SubmitOptions
from .local import LocalBackend
from .slurm import SlurmBackend

__all__ = ["ACTIVE", "EXECUTORS", "GRACE_S", "AlreadySubmitted", "Backend", "BackendUnavailable", "ElementState",
           "SubmitOptions", "attempt_states", "backend", "by_backend", "cancel_all", "choose", "submit_attempt"]


def backend(name: str) -> Backend:
    if name == "slurm":
        return SlurmBackend()
    if name == "local":
        return LocalBackend()
    raise ValueError(f"unknown executor {name!r}: choose one of {', '.join(EXECUTORS)}")


def submit_attempt(attempt: Attempt, executor: str, options: SubmitOptions) -> str:
    """Submit one planned attempt with ``executor``; returns a line for the user."""
    if attempt.executor:
        raise AlreadySubmitted(f"attempt {attempt.number} of {attempt.run.path} was already submitted "
                               f"({attempt.executor}); use `hpc-rerun resubmit {attempt.run.path}` for what is still "
                               "missing")
    return backend(executor).submit(attempt, options)


def choose(requested: str) -> tuple[str, str]:
    """(executor, why): ``auto`` is Slurm where ``srun`` is on PATH, else this machine."""
    if requested != "auto":
        return requested, "asked for"
    if shutil.which("srun"):
        return "slurm", "srun is on PATH"
    return "local", "no srun on PATH"


def by_backend(attempts: list[Attempt]) -> dict[str, list[Attempt]]:
    """The submitted attempts grouped by the executor that runs them."""
    groups: dict[str, list[Attempt]] = {}
    for attempt in attempts:
        if attempt.executor:
            groups.setdefault(attempt.executor, []).append(attempt)
    return groups


def attempt_states(attempts: list[Attempt], now: dt.datetime) -> dict[tuple[int, int], ElementState]:
    """Every submitted attempt's shard states, one round per backend (one sacct + one squeue for Slurm)."""
    states = {}
    for name, group in by_backend(attempts).items():
        states.update(backend(name).states(group, now))
    return states


def cancel_all(attempts: list[Attempt]) -> list[str]:
    """Stop every attempt that may still run, each through its own backend."""
    return [stopped for name, group in by_backend(attempts).items() for stopped in backend(name).cancel(group)]
