"""The local backend: the same shards as a Slurm array, as processes on this machine.

One worker process per visible GPU, each pinned with CUDA_VISIBLE_DEVICES; without a GPU, up to
``--parallel`` CPU workers (default 1). Each worker also gets its own share of the pool's CPUs (its
affinity), so the prompt-preparing threads of four workers on one host do not fight over the same cores.
The pool runs detached and writes each shard's state to ``attempt-N/local-state.json`` (PENDING, RUNNING,
COMPLETED, FAILED, CANCELLED), which ``states`` reads the way the Slurm backend reads sacct; its pid in
plan.json is the run's "job id".

    python -c "from hpc_rerun.backends.local import main; main()" RUN_DIR ATTEMPT [--parallel N]

(not ``-m``: the package imports this module first, and runpy would run it a second time)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..atomic import atomic_write_json
from ..rundir import Attempt, RunDir, now_iso
from .base import GRACE_S, ElementState, SubmitOptions

POOL_MAIN = "from hpc_rerun.backends.local import main; main()"  # the pool process's command (see above)


def visible_gpus() -> list[str]:
    """GPU ids this process may use: CUDA_VISIBLE_DEVICES if set, else what nvidia-smi lists."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip()]
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
        return [str(n) for n, line in enumerate(out.splitlines()) if line.startswith("GPU ")]
    return []


def cpu_shares(cpus: list[int], workers: int) -> list[list[int]]:
    """The pool's CPUs cut into ``workers`` contiguous, disjoint shares (all of them to each when there are
    fewer CPUs than workers)."""
    if len(cpus) < workers:
        return [cpus] * workers
    size, extra = divmod(len(cpus), workers)
    shares, start = [], 0
    for n in range(workers):
        end = start + size + (n < extra)
        shares.append(cpus[start:end])
        start = end
    return shares


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


def stop_pool(pid: int, grace_s: float = 30) -> bool:
    """SIGTERM to the pool, which stops its workers and marks their shards CANCELLED; whatever is
    still alive in its process group after ``grace_s`` is killed."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.time() + grace_s
    while time.time() < deadline and process_alive(pid):
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return True


class LocalBackend:
    name = "local"

    def check(self) -> None:
        """Always usable: the workers are this machine's processes."""

    def submit(self, attempt: Attempt, options: SubmitOptions) -> str:
        """Start the pool for this attempt, detached (it outlives this command)."""
        command = [sys.executable, "-c", POOL_MAIN, str(attempt.run.path), str(attempt.number)]
        if options.parallel:
            command += ["--parallel", str(options.parallel)]
        attempt.folder.mkdir(parents=True, exist_ok=True)
        with open(attempt.pool_log, "ab") as out:
            proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        attempt.record_submission(self.name, {}, pool_pid=proc.pid)
        return f"{len(attempt.shards)} shards running locally (pool pid {proc.pid})"

    def states(self, attempts: list[Attempt], now: dt.datetime) -> dict[tuple[int, int], ElementState]:
        states = {}
        for attempt in attempts:
            recorded = {}
            if attempt.local_state_file.exists():
                recorded = {k: v["state"] for k, v in json.loads(attempt.local_state_file.read_text()).items()}
            pool_alive = bool(attempt.pool_pid) and process_alive(attempt.pool_pid)
            starting = attempt.submitted_at and (now - attempt.submitted_at).total_seconds() < GRACE_S
            for shard in attempt.shards:
                state = recorded.get(str(shard.number), "SUBMITTED" if starting else "LOST")
                if state in ("RUNNING", "PENDING") and not pool_alive:
                    state = "LOST"
                states[(attempt.number, shard.number)] = ElementState(state, f"local:{attempt.pool_pid}")
        return states

    def cancel(self, attempts: list[Attempt]) -> list[str]:
        return [f"local pool {a.pool_pid}" for a in attempts if a.pool_pid and stop_pool(a.pool_pid)]


def run_pool(run: RunDir, number: int, parallel: int) -> int:
    """Run the attempt's shards, one worker per GPU (or ``parallel`` on a CPU); SIGTERM cancels them."""
    attempt = run.attempt(number)
    state = {str(s.number): {"state": "PENDING"} for s in attempt.shards}
    gpus = visible_gpus()
    slots: list[str | None] = gpus if gpus else [None] * max(1, parallel)
    cpus = dict(zip(range(len(slots)), cpu_shares(sorted(os.sched_getaffinity(0)), len(slots))))
    free = list(range(len(slots)))  # slot numbers: a GPU id and a CPU share each
    running: dict[str, tuple[subprocess.Popen, int]] = {}
    pending = list(attempt.shards)
    stopping = False

    def stop(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    atomic_write_json(attempt.local_state_file, state)
    while (pending or running) and not stopping:
        while pending and free:
            shard, slot = pending.pop(0), free.pop(0)
            gpu, share = slots[slot], cpus[slot]
            env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpu if gpu is not None else "")
            command = [sys.executable, "-m", "hpc_rerun.cli", "worker", str(attempt.spec_file(shard))]
            with open(attempt.worker_log(shard), "ab") as out:
                proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=subprocess.STDOUT,
                                        preexec_fn=lambda share=share: os.sched_setaffinity(0, share))
            running[str(shard.number)] = (proc, slot)
            state[str(shard.number)] = {"state": "RUNNING", "pid": proc.pid, "gpu": gpu, "cpus": len(share),
                                          "start": now_iso()}
            atomic_write_json(attempt.local_state_file, state)
        time.sleep(0.5)
        for key, (proc, slot) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[key]
            free.append(slot)
            state[key].update(state="COMPLETED" if proc.returncode == 0 else "FAILED", exit_code=proc.returncode,
                              end=now_iso())
            atomic_write_json(attempt.local_state_file, state)
    if stopping:
        for proc, _ in running.values():
            proc.terminate()
        for key, (proc, _) in running.items():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
            state[key].update(state="CANCELLED", exit_code=proc.returncode, end=now_iso())
        for shard in pending:
            state[str(shard.number)] = {"state": "CANCELLED"}
        atomic_write_json(attempt.local_state_file, state)
        return 1
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(prog="hpc-rerun local pool",
                                     description="Run an attempt's shards on this machine.")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("attempt", type=int)
    parser.add_argument("--parallel", type=int, default=1, help="CPU workers at once when no GPU is visible")
    args = parser.parse_args()
    sys.exit(run_pool(RunDir(args.run_dir), args.attempt, args.parallel))


if __name__ == "__main__":
    main()
