"""status: where a run stands, from the shard files (the truth) and the scheduler (a hint).

The scheduler's states come from each attempt's backend in one round (backends/: one sacct and one squeue
for all of a run's Slurm arrays); a shard the scheduler lost track of whose file holds every answer is
COMPLETED. Totals count unique tasks: a task rerun in a later attempt counts once.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass

from .backends import ACTIVE, ElementState, attempt_states
from .rundir import Record, RunDir, Snapshot


@dataclass
class ShardStatus:
    attempt: int
    shard: int
    job_id: str | None
    state: str
    total: int
    done: int
    errors: int
    first_start: str | None
    last_end: str | None
    open: int  # its tasks that no attempt (this one or a later) has answered yet
    predicted_s: float | None = None  # the plan's estimate of its GPU seconds
    actual_s: float | None = None  # from its first task's start to its last task's end
    note: str | None = None  # the scheduler's story before this state, e.g. "requeued 1x after: preempted"

    @property
    def missing(self) -> int:
        return self.total - self.done

    @property
    def needs_rerun(self) -> bool:
        """Ended with tasks that no attempt has answered: what resubmit reruns."""
        return self.state not in ACTIVE and self.open > 0


def gather(snapshot: Snapshot, now: dt.datetime | None = None) -> list[ShardStatus]:
    """Every shard's state: the scheduler's (one round per backend) checked against its shard file."""
    now = now or dt.datetime.now()
    scheduler = attempt_states(snapshot.plan.attempts, now)
    answered = {r.key for r in snapshot.records()}
    statuses = []
    for view in snapshot.shards:
        number, entry, records = view.attempt.number, view.entry, view.records
        element = scheduler.get((number, entry.number), ElementState("PLANNED", None))
        state = element.state
        keys = {r.key for r in records}
        if state in ("LOST", "ENDED") and len(keys) >= entry.tasks:
            state = "COMPLETED"  # the scheduler lost track, the shard file has every answer
        starts = [r.provenance.start for r in records if r.provenance.start]
        ends = [r.provenance.end for r in records if r.provenance.end]
        statuses.append(ShardStatus(
            attempt=number, shard=entry.number, job_id=element.job_id, state=state, total=entry.tasks,
            done=len(keys), errors=sum(1 for r in records if not r.ok),
            first_start=min(starts) if starts else None, last_end=max(ends) if ends else None,
            open=sum(1 for t in view.tasks if (t["config"], t["id"]) not in answered),
            predicted_s=entry.cost_s, actual_s=_span(starts, ends), note=element.note,
        ))
    return statuses


def _span(starts: list[str], ends: list[str]) -> float | None:
    if not starts or not ends:
        return None
    return (dt.datetime.fromisoformat(max(ends)) - dt.datetime.fromisoformat(min(starts))).total_seconds()


def cost_scale(statuses: list[ShardStatus]) -> float | None:
    """Measured over predicted seconds of the shards that completed: how far the cost model is off here
    (another card, other answers' lengths); None before any shard has completed."""
    done = [s for s in statuses if s.state == "COMPLETED" and s.predicted_s and s.actual_s]
    if not done:
        return None
    return sum(s.actual_s for s in done) / sum(s.predicted_s for s in done)


def summary(snapshot: Snapshot, statuses: list[ShardStatus], now: dt.datetime | None = None) -> dict:
    """Run totals over unique tasks (a task rerun in a later attempt counts once): done, rate, ETA."""
    now = now or dt.datetime.now()
    first = snapshot.plan.attempts[0].number
    planned = {(t["config"], t["id"]) for view in snapshot.shards if view.attempt.number == first for t in view.tasks}
    records: dict[tuple, Record] = snapshot.best()
    total = len(planned)
    done = len(planned & set(records))
    starts = [dt.datetime.fromisoformat(s.first_start) for s in statuses if s.first_start]
    rate = None
    if starts and done:
        elapsed = (now - min(starts)).total_seconds()
        rate = done / elapsed if elapsed > 0 else None
    remaining = total - done
    active = [s for s in statuses if s.state in ACTIVE]
    states: dict[str, int] = {}
    for s in statuses:
        states[s.state] = states.get(s.state, 0) + 1
    errors = sum(1 for key in planned & set(records) if not records[key].ok)
    return {
        "total": total, "done": done, "errors": errors, "remaining": remaining,
        "rate_tasks_per_s": round(rate, 4) if rate else None,
        "eta_s": round(remaining / rate) if rate and remaining and active else None,
        "states": states,
        "needs_rerun": sum(1 for s in statuses if s.needs_rerun),
        "finished": not active,
    }


@dataclass
class RunStatus:
    """One status round: the run read once, every shard's state and the totals."""

    snapshot: Snapshot
    shards: list[ShardStatus]
    totals: dict

    @property
    def run(self) -> RunDir:
        return self.snapshot.run


def status_round(run: RunDir, now: dt.datetime | None = None) -> RunStatus:
    """Read the run directory once and the scheduler once: what ``status``, ``run``'s watch and resubmit show."""
    now = now or dt.datetime.now()
    snapshot = run.snapshot()
    statuses = gather(snapshot, now)
    return RunStatus(snapshot, statuses, summary(snapshot, statuses, now))


def to_json(status: RunStatus) -> dict:
    return {"run_dir": str(status.run.path),
            "shards": [dict(asdict(s), missing=s.missing, needs_rerun=s.needs_rerun) for s in status.shards],
            "summary": status.totals}
