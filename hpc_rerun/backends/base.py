"""The backends' protocol and the types every backend and step shares (states, options, errors)."""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ..rundir import Attempt

if TYPE_CHECKING:  # annotation only: slurm.py imports this module
    from .slurm import SlurmOptions

EXECUTORS = ("slurm", "local")
# The states of an element that may still run: Slurm's, and ours (SUBMITTED: not yet in sacct; ENDING: gone from
# squeue, sacct not yet final). Every other state has ended.
ACTIVE = frozenset({"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED",
                    "SUBMITTED", "ENDING"})
# An element that has shown no sign of life (submission, shard file, logs) this long, and that the scheduler
# no longer knows, is LOST (sacct lags slurmctld by seconds; a local pool writes its state file at start).
GRACE_S = float(os.environ.get("HPC_RERUN_LOST_GRACE_S", 60))


class BackendUnavailable(RuntimeError):
    """The executor asked for cannot be used here (e.g. Slurm's commands are not on PATH)."""


@dataclass
class SubmitOptions:
    """How to submit: Slurm options (defaults < profile < flags, see backends/slurm.py) and local workers."""

    slurm: SlurmOptions | None = None  # None: the defaults
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


class AlreadySubmitted(ValueError):
    """The attempt was submitted before: resubmit plans a new one for what is still missing."""
