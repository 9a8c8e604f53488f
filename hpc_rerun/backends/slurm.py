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
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..benchmark import BenchmarkError
from ..project import read_toml
from ..rundir import Attempt
from .base import ACTIVE, GRACE_S, BackendUnavailable, ElementState, SubmitOptions


def _setting(default, help: str, flag: str | None = None, sbatch: str | None = None, submitit: str | None = None,
             repeatable: bool = False):
    """A Slurm setting, declared once: its default, its command-line ``flag`` (none: profile only), its help,
    the sbatch option it becomes and submitit's parameter that sets it. The profile key is the field's name."""
    factory = (lambda: type(default)()) if isinstance(default, (dict, list)) else None
    metadata = {"help": help, "flag": flag, "sbatch": sbatch, "submitit": submitit, "repeatable": repeatable}
    return field(default_factory=factory, metadata=metadata) if factory else field(default=default, metadata=metadata)


# sbatch options hpc-rerun sets itself (names as sbatch spells them, long and short): --sbatch may not touch them.
MANAGED_SBATCH = {"job-name": "the run's job name (status tells its arrays by it)", "J": "job-name",
                  "array": "one element per shard", "a": "array", "output": "submitit's log files", "o": "output",
                  "error": "submitit's log files", "e": "error", "open-mode": "submitit's log files",
                  "signal": "signal_delay_s in the profile", "requeue": "max_requeues in the profile",
                  "wrap": "the worker command", "parsable": "the job id submitit reads"}


@dataclass
class SlurmOptions:
    """How a run's arrays are submitted: defaults < the options the run was planned with < a site profile
    (TOML, see slurm/profiles/) < command-line flags. plan.json keeps them per attempt (``to_dict``)."""

    partition: str | None = _setting(None, "Slurm partition.", "--partition", "partition", "slurm_partition")
    gres: str | None = _setting("gpu:a100:1", "GPU GRES per array element [default: gpu:a100:1].", "--gres", "gres",
                                "slurm_gres")
    cpus_per_task: int | None = _setting(8, "CPUs per element.", "--cpus", "cpus-per-task", "cpus_per_task")
    mem_gb: int | None = _setting(64, "Host memory per element (GB).", "--mem-gb", "mem", "mem_gb")
    time_min: int | None = _setting(240, "Time limit per element (minutes).", "--time-min", "time", "timeout_min")
    array_parallelism: int | None = _setting(64, "Elements running at once.", "--array-parallelism", None,
                                             "slurm_array_parallelism")
    account: str | None = _setting(None, "Slurm account.", "--account", "account", "slurm_account")
    qos: str | None = _setting(None, "Slurm QoS.", "--qos", "qos", "slurm_qos")
    extra_sbatch: dict = _setting({}, "Extra sbatch option, e.g. --sbatch constraint=a100_80gb (repeatable).",
                                  "--sbatch", None, "slurm_additional_parameters", repeatable=True)
    setup: list = _setting([], "Shell line run before the worker, e.g. 'module load cuda' (repeatable).", "--setup",
                           None, "slurm_setup", repeatable=True)
    signal_delay_s: int | None = _setting(90, "USR2 this long before the time limit: the element requeues itself "
                                          "and resumes.", None, None, "slurm_signal_delay_s")
    max_requeues: int = _setting(3, "Requeues after a time limit or preemption before it ends (TIMEOUT) and "
                                 "resubmit gives it more time.")

    def __post_init__(self):
        self.extra_sbatch = {key.lstrip("-"): value for key, value in (self.extra_sbatch or {}).items()}
        for key in self.extra_sbatch:
            if key in MANAGED_SBATCH or key.replace("_", "-") in MANAGED_SBATCH:
                raise BenchmarkError(f"--sbatch {key}=...: hpc-rerun sets --{key} itself "
                                     f"({MANAGED_SBATCH.get(key.replace('_', '-'), MANAGED_SBATCH.get(key))}); "
                                     "leave it out")
            own = next((f for f in fields(self) if f.metadata["sbatch"] == key.replace("_", "-")), None)
            if own is not None:
                raise BenchmarkError(f"--sbatch {key}=...: use {own.metadata['flag']} (or {own.name} in a profile)")
        self.setup = list(self.setup or [])

    @classmethod
    def from_dict(cls, data: dict | None) -> "SlurmOptions":
        """The options as plan.json or a profile hold them (unknown keys: an error naming them)."""
        data = dict(data or {})
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise BenchmarkError(f"unknown Slurm option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return cls(**data)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def resolve(cls, flags: dict, profile: Path | None = None, base: "dict | None" = None) -> "SlurmOptions":
        """Defaults < ``base`` (what the run was planned with) < the profile < the flags that were given
        (``--sbatch`` as its ``KEY=VALUE`` texts)."""
        merged = {**(base or {}), **load_profile(profile)}
        merged.update({k: v for k, v in flags.items() if v not in (None, (), [], {})})
        if isinstance(merged.get("extra_sbatch"), (list, tuple)):
            merged["extra_sbatch"] = parse_sbatch(merged["extra_sbatch"])
        return cls.from_dict(merged)

    def executor_parameters(self, run_id: str) -> dict:
        """submitit's parameters for these options (empty values left out)."""
        params = {"name": job_name(run_id)}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata["submitit"] and value not in (None, "", {}, []):
                params[f.metadata["submitit"]] = value
        return params

    def sbatch_lines(self, run_id: str, n_shards: int, folder: Path) -> list[str]:
        """The #SBATCH lines the array is submitted with: these options, and what hpc-rerun sets itself."""
        at_once = min(n_shards, self.array_parallelism or n_shards)
        values = {"job-name": job_name(run_id), "array": f"0-{n_shards - 1}%{at_once}"}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata["sbatch"] and value not in (None, ""):
                values[f.metadata["sbatch"]] = f"{value}GB" if f.name == "mem_gb" else value
        values.update({"output": folder / "%A_%a_0_log.out", "error": folder / "%A_%a_0_log.err",
                       "open-mode": "append"})
        if self.signal_delay_s:
            values["signal"] = f"USR2@{self.signal_delay_s}"
        values.update(self.extra_sbatch)
        return [f"#SBATCH --{key}={value}" for key, value in values.items()]


def parse_sbatch(items: list[str]) -> dict[str, str]:
    """``--sbatch KEY=VALUE`` texts -> {KEY: VALUE}."""
    extra = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise BenchmarkError(f"--sbatch {item!r}: expected KEY=VALUE")
        extra[key.lstrip("-")] = value
    return extra


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
    import submitit  # only where something is submitted: status and merge run without it

    check_slurm_clients()
    return submitit.AutoExecutor(folder=str(folder), cluster="slurm", slurm_max_num_timeout=max_requeues)


def load_profile(path: str | Path | None) -> dict:
    """A site profile (TOML, see slurm/profiles/); unknown keys are an error, not a silent no-op."""
    if path is None:
        return {}
    return read_toml(Path(path), "site profile (examples: slurm/profiles/*.toml)",
                     [f.name for f in fields(SlurmOptions)])


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
    if accounted and accounted not in ACTIVE:
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
    if not earlier or state not in ACTIVE:
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
        from ..inference.job import ShardJob  # imports submitit; the worker itself only when it runs

        slurm = options.slurm or SlurmOptions()
        executor = slurm_executor(attempt.run.submitit_folder, slurm.max_requeues)
        run_id = attempt.run.plan().run_id
        executor.update_parameters(**slurm.executor_parameters(run_id))
        shards = attempt.shards
        chunk = max_array_size()
        jobs: dict[int, str] = {}
        for start in range(0, len(shards), chunk):
            part = shards[start:start + chunk]
            submitted = executor.map_array(ShardJob(), [str(attempt.spec_file(s)) for s in part])
            jobs.update({s.number: job.job_id for s, job in zip(part, submitted)})
        attempt.record_submission(self.name, jobs, slurm.to_dict(), job_name=job_name(run_id))
        arrays = sorted({j.split("_")[0] for j in jobs.values()})
        return f"{len(jobs)} shards submitted as job array {', '.join(arrays)}"

    def states(self, attempts: list[Attempt], now: dt.datetime) -> dict[tuple[int, int], ElementState]:
        sacct_rows, squeue_rows, sacct_ok = query([j for a in attempts for j in a.jobs.values()])
        folder = attempts[0].run.submitit_folder if attempts else None
        states = {}
        for attempt in attempts:
            # The name recorded at submission (versions before it recorded none: the run's own).
            name = attempt.job_name or job_name(attempt.run.plan().run_id)
            sacct = our_states(sacct_rows, name, attempt.submitted_at)
            squeue = {e: s[-1] for e, s in our_states(squeue_rows, name, attempt.submitted_at).items()}
            for shard in attempt.shards:
                job_id = attempt.jobs.get(str(shard.number))
                if not job_id:
                    states[(attempt.number, shard.number)] = ElementState("PLANNED", None)
                    continue
                # Signs of life: the submission, the shard file, the element's submitit logs (written at each
                # start and at the end, even by an element that never answered a task).
                logs = [folder / f"{job_id}_0_log.{ext}" for ext in ("out", "err")]
                alive_at = max(filter(None, (attempt.submitted_at,
                                             *map(_modified, [attempt.records_file(shard), *logs]))), default=None)
                history = sacct.get(job_id, [])
                state = resolve_state(job_id, {job_id: history[-1]} if history else {}, squeue, sacct_ok, alive_at, now)
                if state == "FAILED" and timed_out_too_often(folder, job_id):
                    state = "TIMEOUT"
                states[(attempt.number, shard.number)] = ElementState(state, job_id, requeue_note(history, state))
        return states

    def cancel(self, attempts: list[Attempt]) -> list[str]:
        jobs = [job for attempt in attempts for job in attempt.jobs.values()]
        if not jobs:
            return []
        check_slurm_clients(("scancel",))
        subprocess.run(["scancel", *sorted({j.split("_")[0] for j in jobs})], check=False, timeout=60)
        return jobs
