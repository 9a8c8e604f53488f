"""The local executor: the same shards as a Slurm array, as processes on this machine.

One worker process per visible GPU, each pinned with CUDA_VISIBLE_DEVICES; without a GPU, up to
``--parallel`` CPU workers (default 1). The pool runs detached and writes each shard's state to
``attempt-N/local-state.json`` (PENDING, RUNNING, COMPLETED, FAILED, CANCELLED), which ``status``
reads the way it reads sacct for Slurm.

    python -m hpc_rerun.localpool RUN_DIR ATTEMPT [--parallel N]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from .atomic import atomic_write_json
from .plan import load_plan


def visible_gpus() -> list[str]:
    """GPU ids this process may use: CUDA_VISIBLE_DEVICES if set, else what nvidia-smi lists."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip()]
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
        return [str(n) for n, line in enumerate(out.splitlines()) if line.startswith("GPU ")]
    return []


def now() -> str:
    return dt.datetime.now().isoformat(timespec="seconds")


def run_pool(run_dir: Path, attempt: int, parallel: int) -> int:
    plan = load_plan(run_dir)
    shards = plan["attempts"][attempt - 1]["shards"]
    state_path = run_dir / f"attempt-{attempt}" / "local-state.json"
    state = {str(s["shard"]): {"state": "PENDING"} for s in shards}
    gpus = visible_gpus()
    slots: list[str | None] = gpus if gpus else [None] * max(1, parallel)
    free = list(slots)
    running: dict[str, tuple[subprocess.Popen, str | None]] = {}
    pending = [s for s in shards]
    stopping = False

    def stop(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    atomic_write_json(state_path, state)
    while (pending or running) and not stopping:
        while pending and free:
            shard, slot = pending.pop(0), free.pop(0)
            env = dict(os.environ, CUDA_VISIBLE_DEVICES=slot if slot is not None else "")
            log = run_dir / f"attempt-{attempt}" / f"shard-{shard['shard']:04d}.log"
            command = [sys.executable, "-m", "hpc_rerun.cli", "worker", str(run_dir / shard["spec"])]
            with open(log, "ab") as out:
                proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
            running[str(shard["shard"])] = (proc, slot)
            state[str(shard["shard"])] = {"state": "RUNNING", "pid": proc.pid, "gpu": slot, "start": now()}
            atomic_write_json(state_path, state)
        time.sleep(0.5)
        for key, (proc, slot) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[key]
            free.append(slot)
            state[key].update(state="COMPLETED" if proc.returncode == 0 else "FAILED", exit_code=proc.returncode,
                              end=now())
            atomic_write_json(state_path, state)
    if stopping:
        for key, (proc, _) in running.items():
            proc.terminate()
        for key, (proc, _) in running.items():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
            state[key].update(state="CANCELLED", exit_code=proc.returncode, end=now())
        for shard in pending:
            state[str(shard["shard"])] = {"state": "CANCELLED"}
        atomic_write_json(state_path, state)
        return 1
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description="Run an attempt's shards on this machine.")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("attempt", type=int)
    parser.add_argument("--parallel", type=int, default=1, help="CPU workers at once when no GPU is visible")
    args = parser.parse_args()
    sys.exit(run_pool(args.run_dir, args.attempt, args.parallel))


if __name__ == "__main__":
    main()
