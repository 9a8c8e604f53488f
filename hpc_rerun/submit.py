"""submit: one Slurm job array per attempt through submitit, or the same shards on this machine.

Only shard spec paths go through submitit's pickles. Arrays are split to respect the cluster's
MaxArraySize. Job ids and the submission time are written to plan.json, so any later process
(status, resubmit, cancel, merge-shards) can reattach from the run directory alone.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from .project import read_toml
from .executors import check_slurm_clients, slurm_executor
from .plan import load_plan, save_plan

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
        "name": f"hpc-rerun-{run_id}",
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


def sbatch_preview(options: dict, run_dir: Path, n_shards: int) -> str:
    """The #SBATCH lines the array will be submitted with (rendered by submitit itself)."""
    from submitit.slurm.slurm import _make_sbatch_string

    params = executor_parameters(options, run_dir.name)
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
    text = _make_sbatch_string(command=f"{sys.executable} -u -m submitit.core._submit {run_dir / 'submitit'}",
                               folder=run_dir / "submitit", **kwargs)
    return "\n".join(line for line in text.splitlines() if line.startswith("#SBATCH"))


def max_array_size() -> int:
    """The cluster's MaxArraySize (array indices must stay below it)."""
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 1001
    match = re.search(r"^MaxArraySize\s*=\s*(\d+)", out, re.MULTILINE)
    return int(match.group(1)) if match else 1001


def submit_slurm(run_dir: Path, attempt: int, options: dict) -> dict[int, str]:
    """One sbatch job array per chunk of at most MaxArraySize shards; returns shard -> job id."""
    from .worker import ShardJob

    check_slurm_clients()
    plan = load_plan(run_dir)
    entry = plan["attempts"][attempt - 1]
    executor = slurm_executor(run_dir / "submitit", int(options.get("max_requeues", SLURM_DEFAULTS["max_requeues"])))
    executor.update_parameters(**executor_parameters(options, plan["run_id"]))
    shards = entry["shards"]
    chunk = max_array_size()
    jobs: dict[int, str] = {}
    for start in range(0, len(shards), chunk):
        part = shards[start:start + chunk]
        specs = [str(run_dir / s["spec"]) for s in part]
        submitted = executor.map_array(ShardJob(), specs)
        jobs.update({s["shard"]: job.job_id for s, job in zip(part, submitted)})
    record_submission(run_dir, attempt, "slurm", jobs, options)
    return jobs


def record_submission(run_dir: Path, attempt: int, executor: str, jobs: dict, options: dict | None = None,
                      **extra) -> None:
    plan = load_plan(run_dir)
    entry = plan["attempts"][attempt - 1]
    entry.update(executor=executor, jobs={str(k): v for k, v in jobs.items()},
                 submitted=dt.datetime.now().isoformat(timespec="seconds"), **extra)
    if options is not None:
        entry["slurm"] = options
    save_plan(run_dir, plan)


def submit_local(run_dir: Path, attempt: int, parallel: int | None) -> int:
    """Start the local pool for this attempt, detached; returns its pid (the run's "job id")."""
    log = run_dir / f"attempt-{attempt}" / "local-pool.log"
    command = [sys.executable, "-m", "hpc_rerun.localpool", str(run_dir), str(attempt)]
    if parallel:
        command += ["--parallel", str(parallel)]
    with open(log, "ab") as out:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    record_submission(run_dir, attempt, "local", {}, pool_pid=proc.pid)
    return proc.pid


def cancel(run_dir: Path) -> list[str]:
    """Stop every job of the run that may still run; returns what was cancelled."""
    plan = load_plan(run_dir)
    cancelled = []
    slurm_jobs = [job for entry in plan["attempts"] if entry.get("executor") == "slurm"
                  for job in entry.get("jobs", {}).values()]
    if slurm_jobs:
        check_slurm_clients(("scancel",))
        subprocess.run(["scancel", *sorted({j.split("_")[0] for j in slurm_jobs})], check=False, timeout=60)
        cancelled += slurm_jobs
    for entry in plan["attempts"]:
        pid = entry.get("pool_pid")
        if entry.get("executor") == "local" and pid and stop_local_pool(pid):
            cancelled.append(f"local pool {pid}")
    return cancelled


def stop_local_pool(pid: int, grace_s: float = 30) -> bool:
    """SIGTERM to the pool, which stops its workers and marks their shards CANCELLED; whatever is
    still alive in its process group after ``grace_s`` is killed."""
    import time

    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    from .status import process_alive

    deadline = time.time() + grace_s
    while time.time() < deadline and process_alive(pid):
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return True
