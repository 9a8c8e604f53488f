"""status: where a run stands, from the shard files (the truth) and the scheduler (a hint).

The scheduler's states come from each attempt's backend in one round (backends/: one sacct and one squeue
for all of a run's Slurm arrays); a shard the scheduler lost track of whose file holds every answer is
COMPLETED. Totals count unique tasks: a task rerun in a later attempt counts once.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass
from pathlib import Path

from .backends import ElementState, attempt_states
from .rundir import RunDir, record_key

ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED", "SUBMITTED",
          "ENDING"}


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


def gather(run_dir: Path, now: dt.datetime | None = None) -> list[ShardStatus]:
    run = RunDir(run_dir)
    now = now or dt.datetime.now()
    attempts = run.attempts()
    scheduler = attempt_states(attempts, now)
    records_of = {(a.number, s["shard"]): a.records(s) for a in attempts for s in a.shards}
    answered = {record_key(r) for records in records_of.values() for r in records}
    statuses = []
    for attempt in attempts:
        for shard in attempt.shards:
            element = scheduler.get((attempt.number, shard["shard"]), ElementState("PLANNED", None))
            state = element.state
            records = records_of[(attempt.number, shard["shard"])]
            keys = {record_key(r) for r in records}
            if state in ("LOST", "ENDED") and len(keys) >= shard["tasks"]:
                state = "COMPLETED"  # the scheduler lost track, the shard file has every answer
            starts = [r["provenance"]["start"] for r in records if r.get("provenance", {}).get("start")]
            ends = [r["provenance"]["end"] for r in records if r.get("provenance", {}).get("end")]
            open_tasks = sum(1 for t in attempt.spec_tasks(shard) if (t["config"], t["id"]) not in answered)
            statuses.append(ShardStatus(
                attempt=attempt.number, shard=shard["shard"], job_id=element.job_id, state=state,
                total=shard["tasks"], done=len(keys),
                errors=sum(1 for r in records if str(r.get("Prediction", "")).startswith("[ERROR]")),
                first_start=min(starts) if starts else None, last_end=max(ends) if ends else None, open=open_tasks,
                predicted_s=shard.get("cost_s"), actual_s=_span(starts, ends), note=element.note,
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


def task_records(run_dir: Path) -> dict[tuple[str, int], dict]:
    """The best record so far per (config, id) over every attempt (success over error, newer over older)."""
    from .merge import best_records, shard_records

    return {(config, task_id): record for config, ids in best_records(shard_records(Path(run_dir))).items()
            for task_id, record in ids.items()}


def summary(run_dir: Path, statuses: list[ShardStatus], now: dt.datetime | None = None) -> dict:
    """Run totals over unique tasks (a task rerun in a later attempt counts once): done, rate, ETA."""
    now = now or dt.datetime.now()
    first = RunDir(run_dir).attempt(1)
    planned = {(t["config"], t["id"]) for s in first.shards for t in first.spec_tasks(s)}
    records = task_records(run_dir)
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
    errors = sum(1 for key in planned & set(records) if str(records[key].get("Prediction", "")).startswith("[ERROR]"))
    return {
        "total": total, "done": done, "errors": errors, "remaining": remaining,
        "rate_tasks_per_s": round(rate, 4) if rate else None,
        "eta_s": round(remaining / rate) if rate and remaining and active else None,
        "states": states,
        "needs_rerun": sum(1 for s in statuses if s.needs_rerun),
        "finished": not active,
    }


def to_json(run_dir: Path, statuses: list[ShardStatus], now: dt.datetime | None = None) -> dict:
    return {"run_dir": str(run_dir),
            "shards": [dict(asdict(s), missing=s.missing, needs_rerun=s.needs_rerun) for s in statuses],
            "summary": summary(run_dir, statuses, now)}
