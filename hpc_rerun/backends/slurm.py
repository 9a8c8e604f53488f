"""The Slurm backend: one job array per attempt through submitit, and its states from sacct and squeue.

Only shard spec paths go through submitit's pickles. Arrays are split to respect the cluster's
MaxArraySize. Job ids and the submission time go to plan.json, so any later process (status, resubmit,
cancel, merge-shards) reattaches from the run directory alone.

States: one sacct and one squeue call per round for the whole run. sacct lags slurmctld by seconds, so
a state is cross-checked with squeue; an element in neither after a grace period is ``LOST`` (a pending
element scancelled inside its array vanishes from both). Without sacct, squeue and the shard files still
tell most of it. An element that hit its time limit more often than submitit requeues it ends FAILED in
Slurm's books; submitit's result file says why, and it is called TIMEOUT.
"""

from __future__ import annotations

import datetime as dt
import pickle
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..project import read_toml
from ..rundir import Attempt
from . import GRACE_S, BackendUnavailable, ElementState, SubmitOptions

SLURM_DEFAULTS = {
    "partition": None,
    "gres": "gpu:a100:1",
    "cpus_per_task": 8,
    "mem_gb": 64,
    "time_min": 240,
    "array_parallelism": 64,
    "account": None,
    "qos": None,
    "extra_sbatch": {},
    "setup": [],
    "signal_delay_s": 90,  # USR2 this long before the time limit: the element requeues itself and resumes
    "max_requeues": 3,  # ... this many times at most; then it ends (TIMEOUT) and resubmit gives it more time
}


def check_slurm_clients(commands: tuple[str, ...] = ("sbatch", "srun", "sacct", "squeue")) -> None:
    """Fail with a fix when Slurm's commands are missing (submitit would quietly run locally)."""
    missing = [c for c in commands if shutil.which(c) is None]
    if missing:
        raise BackendUnavailable(
            f"Slurm was asked for, but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not on PATH. "
            "Load your cluster's Slurm module (e.g. `module load slurm`), start the dev cluster "
            "(`sudo slurm/dev-cluster start`), or use `--executor local`."
        )


def slurm_executor(folder: str | Path, max_requeues: int = 3):
    """A submitit executor that is Slurm for certain (``cluster="slurm"``: never submitit's silent local
    fall-back). An element signalled before its time limit requeues itself up to ``max_requeues`` times."""
    import submitit

    check_slurm_clients()
    return submitit.AutoExecutor(folder=str(folder), cluster="slurm", slurm_max_num_timeout=max_requeues)


def load_profile(path: str | Path | None) -> dict:
    """A site profile (TOML, see slurm/profiles/); unknown keys are an error, not a silent no-op."""
    if path is None:
        return {}
    return read_toml(Path(path), "site profile (examples: slurm/profiles/*.toml)", list(SLURM_DEFAULTS))


def slurm_options(profile: dict, overrides: dict) -> dict:
    """Defaults, then the profile, then command-line flags (those that were given)."""
    options = {**SLURM_DEFAULTS, **profile}
    options.update({k: v for k, v in overrides.items() if v not in (None, (), [], {})})
    return options


def executor_parameters(options: dict, run_id: str) -> dict:
    """submitit parameters for the options (empty values left out)."""
    params = {
        "name": job_name(run_id),
        "slurm_partition": options.get("partition"),
        "slurm_gres": options.get("gres"),
        "cpus_per_task": options.get("cpus_per_task"),
        "mem_gb": options.get("mem_gb"),
        "timeout_min": options.get("time_min"),
        "slurm_array_parallelism": options.get("array_parallelism"),
        "slurm_account": options.get("account"),
        "slurm_qos": options.get("qos"),
        "slurm_additional_parameters": dict(options.get("extra_sbatch") or {}),
        "slurm_setup": list(options.get("setup") or []),
        "slurm_signal_delay_s": options.get("signal_delay_s"),
    }
    return {k: v for k, v in params.items() if v not in (None, "", {}, [])}


def sbatch_preview(options: dict, run_path: Path, n_shards: int) -> str:
    """The #SBATCH lines the array will be submitted with (rendered by submitit itself)."""
    from submitit.slurm.slurm import _make_sbatch_string

    params = executor_parameters(options, run_path.name)
    kwargs = {
        "job_name": params["name"],
        "partition": params.get("slurm_partition"),
        "gres": params.get("slurm_gres"),
        "cpus_per_task": params.get("cpus_per_task"),
        "mem": f"{params['mem_gb']}GB" if params.get("mem_gb") else None,
        "time": params.get("timeout_min", 5),
        "account": params.get("slurm_account"),
        "qos": params.get("slurm_qos"),
        "additional_parameters": params.get("slurm_additional_parameters"),
        "setup": params.get("slurm_setup"),
        "array_parallelism": params.get("slurm_array_parallelism", 256),
        "map_count": n_shards,
    }
    text = _make_sbatch_string(command=f"{sys.executable} -u -m submitit.core._submit {run_path / 'submitit'}",
                               folder=run_path / "submitit", **kwargs)
    return "\n".join(line for line in text.splitlines() if line.startswith("#SBATCH"))


def max_array_size() -> int:
    """The cluster's MaxArraySize (array indices must stay below it)."""
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 1001
    match = re.search(r"^MaxArraySize\s*=\s*(\d+)", out, re.MULTILINE)
    return int(match.group(1)) if match else 1001


def _run(command: list[str]) -> str | None:
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


SACCT_FIELDS = "JobID,JobName,Submit,State"
SQUEUE_FORMAT = "%i|%j|%V|%T"
SUBMIT_SLACK = dt.timedelta(minutes=5)  # Slurm's submit time precedes the one plan.json records by seconds


@dataclass
class Row:
    """One line of sacct (-P -D -X -o JobID,JobName,Submit,State) or squeue (-o %i|%j|%V|%T), per element."""

    element: str
    name: str
    submitted: dt.datetime | None
    state: str


def parse_rows(text: str) -> list[Row]:
    """Rows per element, in the order printed: pending elements still inside their array record come as
    ranges (``123_[4-7,9%2]``) and are expanded; ``CANCELLED by 0`` is CANCELLED; an empty state UNKNOWN."""
    rows = []
    for line in text.splitlines():
        fields = line.split("|")
        if len(fields) != 4:
            continue
        job, name, submitted, state = (f.strip() for f in fields)
        try:
            when = dt.datetime.fromisoformat(submitted)
        except ValueError:
            when = None
        state = state.split()[0] if state else "UNKNOWN"
        rows += [Row(element, name, when, state) for element in expand_job_ids(job)]
    return rows


def our_states(rows: list[Row], name: str, since: dt.datetime | None) -> dict[str, list[str]]:
    """element -> its states, oldest first, counting only the rows of this attempt's array: its job name,
    submitted no earlier than the attempt. Job ids restart after a cluster's state is reset, and sacct then
    answers for another job with the same id."""
    states: dict[str, list[str]] = {}
    for row in rows:
        if row.name != name or (since and row.submitted and row.submitted < since - SUBMIT_SLACK):
            continue
        states.setdefault(row.element, []).append(row.state)
    return states


def query(job_ids: list[str]) -> tuple[list[Row], list[Row], bool]:
    """(sacct rows, squeue rows, whether sacct answered) for the arrays of these element ids, in one call
    each. sacct with --duplicates: every record of a requeued element, and of a reused job id."""
    if not job_ids:
        return [], [], True
    arrays = ",".join(sorted({j.split("_")[0] for j in job_ids}))
    sacct_out = _run(["sacct", "-n", "-P", "-D", "-X", "-j", arrays, "-o", SACCT_FIELDS])
    squeue_out = _run(["squeue", "-h", "-r", "-j", arrays, "-o", SQUEUE_FORMAT])
    return parse_rows(sacct_out or ""), parse_rows(squeue_out or ""), sacct_out is not None


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
    """One element's state. ``last_sign_of_life`` is the latest of its submission, its shard file's last write
    and its submitit logs: an element only becomes LOST once it has been silent for the grace period."""
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


def job_name(run_id: str) -> str:
    """The name of a run's arrays (sbatch --job-name): what tells our jobs from others with the same id."""
    return f"hpc-rerun-{run_id}"


REQUEUE_CAUSES = {"PREEMPTED": "preempted", "REQUEUED": "signalled", "NODE_FAIL": "node failure",
                  "TIMEOUT": "time limit"}


def requeue_note(history: list[str], state: str) -> str | None:
    """What happened before an element's current run, while it lasts: ``requeued 1x after: preempted``."""
    earlier = [s for s in history[:-1] if s in REQUEUE_CAUSES]
    if not earlier or state not in ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "ENDING"):
        return None
    causes = ", ".join(dict.fromkeys(REQUEUE_CAUSES[s] for s in earlier))
    return f"requeued {len(earlier)}x after: {causes}"


def _modified(path: Path) -> dt.datetime | None:
    try:
        return dt.datetime.fromtimestamp(path.stat().st_mtime)
    except OSError:
        return None


class SlurmBackend:
    name = "slurm"

    def check(self) -> None:
        check_slurm_clients()

    def submit(self, attempt: Attempt, options: SubmitOptions) -> str:
        """One sbatch job array per chunk of at most MaxArraySize shards."""
        from ..inference.job import ShardJob

        slurm = options.slurm
        executor = slurm_executor(attempt.run.submitit_folder,
                                  int(slurm.get("max_requeues", SLURM_DEFAULTS["max_requeues"])))
        run_id = attempt.run.load()["run_id"]
        executor.update_parameters(**executor_parameters(slurm, run_id))
        shards = attempt.shards
        chunk = max_array_size()
        jobs: dict[int, str] = {}
        for start in range(0, len(shards), chunk):
            part = shards[start:start + chunk]
            submitted = executor.map_array(ShardJob(), [str(attempt.spec_file(s)) for s in part])
            jobs.update({s["shard"]: job.job_id for s, job in zip(part, submitted)})
        extra = slurm.get("extra_sbatch") or {}
        name = extra.get("job-name") or extra.get("job_name") or job_name(run_id)  # what sacct will show
        attempt.record_submission(self.name, jobs, slurm, job_name=name)
        arrays = sorted({j.split("_")[0] for j in jobs.values()})
        return f"{len(jobs)} shards submitted as job array {', '.join(arrays)}"

    def states(self, attempts: list[Attempt], now: dt.datetime) -> dict[tuple[int, int], ElementState]:
        sacct_rows, squeue_rows, sacct_ok = query([j for a in attempts for j in a.jobs.values()])
        folder = attempts[0].run.submitit_folder if attempts else None
        states = {}
        for attempt in attempts:
            name = attempt.entry.get("job_name") or job_name(attempt.run.load()["run_id"])
            sacct = our_states(sacct_rows, name, attempt.submitted)
            squeue = {e: s[-1] for e, s in our_states(squeue_rows, name, attempt.submitted).items()}
            for shard in attempt.shards:
                job_id = attempt.jobs.get(str(shard["shard"]))
                if not job_id:
                    states[(attempt.number, shard["shard"])] = ElementState("PLANNED", None)
                    continue
                # Signs of life: the submission, the shard file, the element's submitit logs (written at each
                # start and at the end, even by an element that never answered a task).
                logs = [folder / f"{job_id}_0_log.{ext}" for ext in ("out", "err")]
                alive_at = max(filter(None, (attempt.submitted, *map(_modified, [attempt.records_file(shard), *logs]))),
                               default=None)
                history = sacct.get(job_id, [])
                state = resolve_state(job_id, {job_id: history[-1]} if history else {}, squeue, sacct_ok, alive_at, now)
                if state == "FAILED" and timed_out_too_often(folder, job_id):
                    state = "TIMEOUT"
                states[(attempt.number, shard["shard"])] = ElementState(state, job_id, requeue_note(history, state))
        return states

    def cancel(self, attempts: list[Attempt]) -> list[str]:
        jobs = [job for attempt in attempts for job in attempt.jobs.values()]
        if not jobs:
            return []
        check_slurm_clients(("scancel",))
        subprocess.run(["scancel", *sorted({j.split("_")[0] for j in jobs})], check=False, timeout=60)
        return jobs
