"""The dev cluster is a real Slurm: submitit arrays, GRES limits and failures behave as on a site."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cloudpickle
import pytest
import submitit

from hpc_rerun.backends import BackendUnavailable as SlurmUnavailable
from hpc_rerun.backends.slurm import slurm_executor

from .conftest import DEV_CLUSTER, max_overlap

# The array elements unpickle these functions in a fresh interpreter: ship them by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(240)]


def record_gpu_slot(index: int) -> dict:
    start = time.time()
    time.sleep(3)
    return {
        "index": index,
        "start": start,
        "end": time.time(),
        "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "array_task": os.environ.get("SLURM_ARRAY_TASK_ID"),
        "square": index * index,
    }


def fail_on_three(index: int) -> int:
    if index == 3:
        raise ValueError(f"task {index} is broken on purpose")
    return index



def test_array_on_fake_gpus_runs_at_most_four_at_once(slurm_cluster, tmp_path):
    executor = slurm_executor(tmp_path / "submitit")
    executor.update_parameters(slurm_gres="gpu:a100:1", slurm_array_parallelism=8, timeout_min=5, cpus_per_task=1)
    jobs = executor.map_array(record_gpu_slot, list(range(8)))
    assert len({j.job_id.split("_")[0] for j in jobs}) == 1, "one sbatch for the whole array"
    results = [j.result() for j in jobs]

    assert [r["square"] for r in results] == [i * i for i in range(8)]
    assert sorted(int(r["array_task"]) for r in results) == list(range(8))
    intervals = [(r["start"], r["end"]) for r in results]
    assert 2 <= max_overlap(intervals) <= 4, intervals
    for r in results:
        assert r["cuda"] in {"0", "1", "2", "3"}, r
    # Calls that ran at the same time never shared a GPU.
    for a in results:
        for b in results:
            if a is not b and a["start"] < b["end"] and b["start"] < a["end"]:
                assert a["cuda"] != b["cuda"], (a, b)


def test_failing_call_surfaces_with_its_traceback(slurm_cluster, tmp_path):
    executor = slurm_executor(tmp_path / "submitit")
    executor.update_parameters(timeout_min=5, cpus_per_task=1)
    jobs = executor.map_array(fail_on_three, [2, 3])
    assert jobs[0].result() == 2
    with pytest.raises(submitit.core.utils.FailedJobError) as err:
        jobs[1].result()
    assert "task 3 is broken on purpose" in str(err.value)
    assert "fail_on_three" in str(err.value), "the traceback names the failing function"


def test_missing_srun_is_an_error_not_a_local_run(no_slurm_path, tmp_path):
    with pytest.raises(SlurmUnavailable, match="srun.*not on PATH.*--executor local"):
        slurm_executor(tmp_path / "submitit")
    assert not (tmp_path / "submitit").exists(), "nothing was submitted or written"


def test_second_start_is_harmless(slurm_cluster):
    proc = subprocess.run([str(DEV_CLUSTER), "start"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "already running" in proc.stdout
    assert subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True).stdout.strip() == "idle"


def test_start_without_root_says_so(tmp_path):
    # A copy nobody can read: the clone may sit in a private home (/root is 0700), and so does pytest's tmp_path.
    readable = Path(tempfile.mkdtemp(prefix="hpc-rerun-dev-cluster-"))
    try:
        readable.chmod(0o755)
        script = readable / "dev-cluster"
        shutil.copy(DEV_CLUSTER, script)
        script.chmod(0o755)
        proc = subprocess.run(
            ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "bash", str(script), "start"],
            capture_output=True, text=True, timeout=60, env={**os.environ, "HPC_RERUN_SLURM_DIR": str(tmp_path)},
        )
    finally:
        shutil.rmtree(readable)
    assert proc.returncode == 1, proc.stderr
    assert "must run as root" in proc.stderr


def test_start_with_a_busy_port_names_it(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {**os.environ, "HPC_RERUN_SLURM_DIR": str(tmp_path / "state"), "HPC_RERUN_SLURM_PORT": str(port)}
        proc = subprocess.run([str(DEV_CLUSTER), "start"], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 1
    assert f"port {port} on 127.0.0.1 is already in use" in proc.stderr
    assert "HPC_RERUN_SLURM_PORT=" in proc.stderr, "the message says how to pick other ports"
    assert not (tmp_path / "state" / "run" / "munged.pid").exists(), "no daemon was started"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"  # a zombie has exited; only its parent can reap it
    except FileNotFoundError:
        return False


def test_stop_leaves_no_daemon_and_start_brings_it_back(slurm_cluster, tmp_path):
    run_dir = os.path.join(os.path.dirname(os.path.dirname(slurm_cluster)), "run")
    pids = {name[:-4]: int(open(os.path.join(run_dir, name)).read()) for name in os.listdir(run_dir)
            if name.endswith(".pid")}
    node = subprocess.run(["hostname", "-s"], capture_output=True, text=True, check=True).stdout.strip()
    assert set(pids) == {"munged", "mariadbd", "slurmdbd", "slurmctld", f"slurmd-{node}"}
    try:
        stop = subprocess.run([str(DEV_CLUSTER), "stop"], capture_output=True, text=True, timeout=120)
        assert stop.returncode == 0, stop.stderr
        assert [name for name, pid in pids.items() if _alive(pid)] == []
        assert subprocess.run([str(DEV_CLUSTER), "status"], capture_output=True).returncode == 3
    finally:
        start = subprocess.run([str(DEV_CLUSTER), "start"], capture_output=True, text=True, timeout=120)
    assert start.returncode == 0, start.stderr
    executor = slurm_executor(tmp_path / "submitit")
    executor.update_parameters(timeout_min=5, cpus_per_task=1)
    assert executor.submit(fail_on_three, 5).result() == 5, "jobs run again after the restart"
