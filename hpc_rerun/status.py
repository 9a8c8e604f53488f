"""status: where a run stands, from the shard files (the truth) and the scheduler (a hint).

One sacct and one squeue call per round for the whole run. sacct lags slurmctld by seconds, so a
state is cross-checked with squeue; an element in neither after a grace period is ``LOST`` (a
pending element scancelled inside its array vanishes from both). Without sacct, squeue and the
shard files still tell most of it. An element that hit its time limit more often than submitit requeues
it ends FAILED in Slurm's books; submitit's result file says why, and status calls it TIMEOUT.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import pickle
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from .plan import load_plan
from .shards import read_records

ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED", "SUBMITTED",
          "ENDING"}
GRACE_S = float(os.environ.get("HPC_RERUN_LOST_GRACE_S", 60))  # sacct can lag slurmctld by seconds


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

    @property
    def missing(self) -> int:
        return self.total - self.done

    @property
    def needs_rerun(self) -> bool:
        """Ended with tasks that no attempt has answered: what resubmit reruns."""
        return self.state not in ACTIVE and self.open > 0


def _run(command: list[str]) -> str | None:
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def slurm_states(job_ids: list[str]) -> tuple[dict[str, str], dict[str, str], bool]:
    """(sacct states, squeue states, whether sacct answered) for array element ids like ``123_4``."""
    if not job_ids:
        return {}, {}, True
    arrays = sorted({j.split("_")[0] for j in job_ids})
    sacct_out = _run(["sacct", "-n", "-P", "-X", "-j", ",".join(arrays), "-o", "JobID,State"])
    squeue_out = _run(["squeue", "-h", "-r", "-j", ",".join(arrays), "-o", "%i|%T"])
    return parse_states(sacct_out or ""), parse_states(squeue_out or ""), sacct_out is not None


def parse_states(text: str) -> dict[str, str]:
    """``JobID|State`` lines (sacct -P, squeue -o %i|%T) -> element id -> state. Pending elements still inside
    their array record come as ranges (``123_[4-7,9%2]``) and are expanded; ``CANCELLED by 0`` is CANCELLED;
    an empty state is UNKNOWN. A later line for the same element (a requeued one) wins."""
    states = {}
    for line in text.splitlines():
        job, _, state = line.partition("|")
        state = state.split()[0] if state.strip() else "UNKNOWN"
        for element in expand_job_ids(job.strip()):
            states[element] = state
    return states


def expand_job_ids(job: str) -> list[str]:
    """``123_[4-7,9%2]`` -> 123_4 ... 123_7, 123_9 (``%N`` is the array's throttle); other ids as they are."""
    array, sep, index = job.partition("_")
    if not sep or not index.startswith("["):
        return [job] if job else []
    elements = []
    for part in index.strip("[]").split("%")[0].split(","):
        first, dash, last = part.partition("-")
        if first.isdigit() and (not dash or last.isdigit()):
            elements += [f"{array}_{n}" for n in range(int(first), int(last if dash else first) + 1)]
    return elements


def resolve_state(job_id: str, sacct: dict, squeue: dict, sacct_ok: bool, last_sign_of_life: dt.datetime | None,
                  now: dt.datetime) -> str:
    """One element's state. ``last_sign_of_life`` is the later of its submission and its shard file's
    last write: an element only becomes LOST once it has been silent for the grace period."""
    queued = squeue.get(job_id)
    accounted = sacct.get(job_id)
    if queued:  # slurmctld's own view is the freshest
        return queued
    if accounted and accounted not in ("PENDING", "RUNNING", "REQUEUED"):
        return accounted
    recent = last_sign_of_life is not None and (now - last_sign_of_life).total_seconds() < GRACE_S
    if recent:
        return "SUBMITTED" if accounted is None else "ENDING"  # sacct lags slurmctld by seconds
    return "LOST" if sacct_ok else "ENDED"  # without accounting, only the shard file can tell


def timed_out_too_often(submitit_folder: Path, job_id: str) -> bool:
    """submitit's verdict on a failed element: it stopped requeueing it after its time limit (its result
    file holds the error ``Job not requeued because: timed-out too many times``)."""
    try:
        with open(submitit_folder / f"{job_id}_0_result.pkl", "rb") as fh:
            outcome, detail = pickle.load(fh)
    except (OSError, ValueError, TypeError, EOFError, pickle.UnpicklingError, AttributeError, ImportError):
        return False
    return outcome == "error" and "timed-out too many times" in str(detail)


def local_states(run_dir: Path, attempt: dict) -> dict[str, str]:
    path = run_dir / f"attempt-{attempt['attempt']}" / "local-state.json"
    if not path.exists():
        return {}
    states = {k: v["state"] for k, v in json.loads(path.read_text()).items()}
    pool = attempt.get("pool_pid")
    pool_alive = bool(pool) and process_alive(pool)
    return {k: ("LOST" if s in ("RUNNING", "PENDING") and not pool_alive else s) for k, s in states.items()}


def process_alive(pid: int) -> bool:
    """A live process (a zombie, exited but not reaped, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except OSError:
        return True


def gather(run_dir: Path, now: dt.datetime | None = None) -> list[ShardStatus]:
    run_dir = Path(run_dir)
    now = now or dt.datetime.now()
    plan = load_plan(run_dir)
    slurm_ids = [j for a in plan["attempts"] if a.get("executor") == "slurm" for j in a.get("jobs", {}).values()]
    sacct, squeue, sacct_ok = slurm_states(slurm_ids)
    records_of = {shard["spec"]: read_records((run_dir / shard["spec"]).with_suffix(".jsonl"))
                  for attempt in plan["attempts"] for shard in attempt["shards"]}
    answered = {((r.get("provenance") or {}).get("config"), r.get("id")) for rs in records_of.values() for r in rs}
    statuses = []
    for attempt in plan["attempts"]:
        submitted = dt.datetime.fromisoformat(attempt["submitted"]) if attempt.get("submitted") else None
        local = local_states(run_dir, attempt) if attempt.get("executor") == "local" else {}
        for shard in attempt["shards"]:
            key = str(shard["shard"])
            job_id = attempt.get("jobs", {}).get(key)
            shard_file = (run_dir / shard["spec"]).with_suffix(".jsonl")
            if attempt.get("executor") == "slurm" and job_id:
                # Signs of life: the submission, the shard file, the element's submitit logs (written at each
                # start and at the end, even by an element that never answered a task).
                logs = [run_dir / "submitit" / f"{job_id}_0_log.{ext}" for ext in ("out", "err")]
                alive_at = max(filter(None, (submitted, *map(_modified, [shard_file, *logs]))), default=None)
                state = resolve_state(job_id, sacct, squeue, sacct_ok, alive_at, now)
                if state == "FAILED" and timed_out_too_often(run_dir / "submitit", job_id):
                    state = "TIMEOUT"
            elif attempt.get("executor") == "local":
                state = local.get(key, "SUBMITTED" if submitted and (now - submitted).total_seconds() < GRACE_S
                                  else "LOST")
            else:
                state = "PLANNED"
            records = records_of[shard["spec"]]
            keys = {(r.get("provenance", {}).get("config"), r.get("id")) for r in records}
            if state in ("LOST", "ENDED") and len(keys) >= shard["tasks"]:
                state = "COMPLETED"  # the scheduler lost track, the shard file has every answer
            starts = [r["provenance"]["start"] for r in records if r.get("provenance", {}).get("start")]
            ends = [r["provenance"]["end"] for r in records if r.get("provenance", {}).get("end")]
            open_tasks = sum(1 for t in _spec_tasks(run_dir / shard["spec"]) if (t["config"], t["id"]) not in answered)
            statuses.append(ShardStatus(
                attempt=attempt["attempt"], shard=shard["shard"], job_id=job_id or (
                    f"local:{attempt.get('pool_pid')}" if attempt.get("executor") == "local" else None),
                state=state, total=shard["tasks"], done=len(keys),
                errors=sum(1 for r in records if str(r.get("Prediction", "")).startswith("[ERROR]")),
                first_start=min(starts) if starts else None, last_end=max(ends) if ends else None, open=open_tasks,
                predicted_s=shard.get("cost_s"), actual_s=_span(starts, ends),
            ))
    return statuses


def _modified(path: Path) -> dt.datetime | None:
    try:
        return dt.datetime.fromtimestamp(path.stat().st_mtime)
    except OSError:
        return None


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
    plan = load_plan(run_dir)
    planned = {(t["config"], t["id"]) for s in plan["attempts"][0]["shards"]
               for t in _spec_tasks(Path(run_dir) / s["spec"])}
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


def _spec_tasks(spec_path: Path) -> list[dict]:
    return json.loads(spec_path.read_text())["tasks"]


def to_json(run_dir: Path, statuses: list[ShardStatus], now: dt.datetime | None = None) -> dict:
    return {"run_dir": str(run_dir),
            "shards": [dict(asdict(s), missing=s.missing, needs_rerun=s.needs_rerun) for s in statuses],
            "summary": summary(run_dir, statuses, now)}
