"""Where shards run. One small protocol, two implementations (as submitit splits core/, slurm/, local/):

- ``slurm``: one job array per attempt through submitit (backends/slurm.py);
- ``local``: the same shards as processes on this machine, one per GPU (backends/local.py).

Every step that submits, asks for states or cancels goes through ``backend(name)``; nothing outside this
package branches on the executor.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
from dataclasses import dataclass, field
from typing import Protocol

from ..rundir import Attempt

EXECUTORS = ("slurm", "local")
# An element that has shown no sign of life (submission, shard file, logs) this long, and that the scheduler
# no longer knows, is LOST (sacct lags slurmctld by seconds; a local pool writes its state file at start).
GRACE_S = float(os.environ.get("HPC_RERUN_LOST_GRACE_S", 60))


class BackendUnavailable(RuntimeError):
    """The executor asked for cannot be used here (e.g. Slurm's commands are not on PATH)."""


@dataclass
class SubmitOptions:
    """How to submit: Slurm options (defaults < profile < flags, see backends/slurm.py) and local workers."""

    slurm: dict = field(default_factory=dict)
    parallel: int = 1  # local: CPU workers at once when no GPU is visible


@dataclass
class ElementState:
    """One shard's scheduler state (a hint: the shard file is the truth) and the id that names it."""

    state: str
    job_id: str | None
    note: str | None = None  # what happened before, e.g. "requeued 1x after: preempted"


class Backend(Protocol):
    name: str

    def submit(self, attempt: Attempt, options: SubmitOptions) -> str:
        """Start every shard of the attempt and record it in plan.json; returns a line for the user."""

    def states(self, attempts: list[Attempt], now: dt.datetime) -> dict[tuple[int, int], ElementState]:
        """(attempt, shard) -> state for these attempts (all submitted with this backend), in one round."""

    def cancel(self, attempts: list[Attempt]) -> list[str]:
        """Stop what may still run of these attempts; returns what was stopped."""

    def check(self) -> None:
        """Raise BackendUnavailable, with the fix, when this executor cannot run here."""


def backend(name: str) -> Backend:
    if name == "slurm":
        from .slurm import SlurmBackend

        return SlurmBackend()
    if name == "local":
        from .local import LocalBackend

        return LocalBackend()
    raise ValueError(f"unknown executor {name!r}: choose one of {', '.join(EXECUTORS)}")


class AlreadySubmitted(ValueError):
    """The attempt was submitted before: resubmit plans a new one for what is still missing."""


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
