"""Failures users meet on real clusters and disks: each ends with a complete tree, no success lost,
no duplicate id, nothing hanging."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpc_rerun.demo import write_demo
from hpc_rerun.results import item_ok, load_result_file
from hpc_rerun.shards import read_records

from .conftest import DEV_CLUSTER

HPC_RERUN = [sys.executable, "-m", "hpc_rerun.cli"]
PROFILE = Path(__file__).parent.parent / "slurm" / "profiles" / "dev-cluster.toml"


def cli(*args, timeout=300, env=None, check=False):
    proc = subprocess.run([*HPC_RERUN, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def plan_demo(paths, shards=2, *extra) -> Path:
    cli("plan", paths["results"], "--data-root", paths["data"], "--tasks", paths["tasks"], "--model", paths["model"],
        "--greedy", "--max-new-tokens", 16, "--shards", shards, "--logs", paths["root"] / "logs", "--run-id", "run",
        "--profile", PROFILE, *extra, check=True)
    return paths["root"] / "logs" / "run"


def wait_finished(run_dir: Path, limit_s: float, env=None) -> dict:
    deadline = time.time() + limit_s
    while time.time() < deadline:
        out = cli("status", run_dir, "--json", env=env).stdout
        status = json.loads(out)
        if status["summary"]["finished"]:
            return status
        time.sleep(1)
    pytest.fail(f"{run_dir} did not finish within {limit_s} s")


def assert_tree_complete(paths):
    """No runnable gap, no duplicate id, every earlier success still there."""
    scan = json.loads(cli("scan", paths["results"], "--data-root", paths["data"], "--tasks", paths["tasks"],
                          "--json").stdout)
    for config in scan["configs"]:
        assert config["runnable"] == [] and config["duplicates"] == [], config
        items = load_result_file(config["result_file"]).items
        assert len({i["id"] for i in items}) == len(items)
        assert all(item_ok(i) for i in items if i["Prediction"] == "an earlier answer")


@pytest.fixture
def demo_paths(tmp_path):
    return write_demo(tmp_path / "bench")


@pytest.mark.timeout(240)
def test_disk_full_during_merge_changes_nothing_then_merge_completes(demo_paths, tmp_path):
    run_dir = plan_demo(demo_paths)
    cli("submit", run_dir, "--executor", "local", "--parallel", 2, check=True)
    wait_finished(run_dir, 200)
    mount = tmp_path / "full"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
    try:
        shutil.copytree(demo_paths["results"], mount / "results")
        free = shutil.disk_usage(mount).free
        (mount / "ballast").write_bytes(b"\0" * (free - 8192))  # a few KB left: not enough for any rewrite
        before = {p: p.read_bytes() for p in (mount / "results").rglob("*.json")}
        proc = cli("merge-shards", run_dir, "--into", mount / "results", "--force")
        assert proc.returncode == 3, proc.stdout + proc.stderr
        assert "No space left on device" in proc.stderr and "was left as it was" in proc.stderr
        assert {p: p.read_bytes() for p in (mount / "results").rglob("*.json")} == before
        assert not list((mount / "results").rglob(".*.tmp")), "no temp file left behind"
        (mount / "ballast").unlink()
        cli("merge-shards", run_dir, "--into", mount / "results", "--force", check=True)
        merged = load_result_file(mount / "results/qwen3vl_text/text_csv/results.json").items
        assert {i["id"] for i in merged} >= {1636, 2907, 1957}
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_corrupt_line_in_a_shard_file_is_skipped_not_fatal(demo_paths, tmp_path):
    shard = tmp_path / "attempt-1" / "shard-0000.jsonl"
    shard.parent.mkdir()
    good = {"id": 1634, "Prediction": "Yes", "provenance": {"config": "qwen3vl_resize_pic/image", "attempt": 1}}
    shard.write_text(json.dumps(good) + "\n{not json at all\n" + json.dumps(dict(good, id=2906)) + "\n")
    assert [r["id"] for r in read_records(shard)] == [1634, 2906]


@pytest.mark.timeout(240)
def test_run_directories_and_backups_follow_the_umask(demo_paths):
    env = dict(os.environ)
    code = ("import os, sys; os.umask(0o027); from hpc_rerun.cli import main; sys.argv = ['hpc-rerun'] + sys.argv[1:];"
            " main()")
    def run(*args):
        proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env,
                              timeout=200)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    run("plan", demo_paths["results"], "--data-root", demo_paths["data"], "--tasks", demo_paths["tasks"], "--model",
        demo_paths["model"], "--greedy", "--max-new-tokens", 8, "--shards", 1, "--logs", demo_paths["root"] / "logs",
        "--run-id", "run")
    run_dir = demo_paths["root"] / "logs" / "run"
    run("worker", run_dir / "attempt-1" / "shard-0000.json")
    run("merge-shards", run_dir)
    written = [*run_dir.rglob("*"), *demo_paths["results"].rglob("*.bak-*"),
               *demo_paths["results"].rglob("skip_ids.json")]
    assert written
    for path in written:
        mode = path.stat().st_mode & 0o777
        assert not mode & 0o002, f"{path} is world-writable ({oct(mode)})"
        assert not mode & 0o007, f"{path} ignores the umask 027 ({oct(mode)})"


@pytest.mark.slurm
@pytest.mark.timeout(420)
def test_sacct_unavailable_mid_run(slurm_cluster, demo_paths):
    """slurmdbd stops while the array runs: status still works (squeue + shard files), the run completes."""
    run_dir = plan_demo(demo_paths, 3)
    cli("submit", run_dir, check=True)
    pid_file = Path(slurm_cluster).parent.parent / "run" / "slurmdbd.pid"
    os.kill(int(pid_file.read_text()), signal.SIGTERM)
    try:
        time.sleep(2)
        assert subprocess.run(["sacct", "-n", "-X"], capture_output=True, timeout=60).returncode != 0
        status = wait_finished(run_dir, 300, env={"HPC_RERUN_LOST_GRACE_S": "5"})
        assert status["summary"]["done"] == status["summary"]["total"]
        assert {s["state"] for s in status["shards"]} <= {"ENDED", "COMPLETED"}
    finally:
        subprocess.run([str(DEV_CLUSTER), "start"], check=True, capture_output=True, timeout=120)
    cli("merge-shards", run_dir, check=True)
    assert_tree_complete(demo_paths)


@pytest.mark.slurm
@pytest.mark.timeout(480)
def test_node_down_during_a_run_and_back(slurm_cluster, demo_paths):
    """The node goes DOWN under a running array (its jobs die), comes back; resubmit completes the tree."""
    run_dir = plan_demo(demo_paths, 3, "--array-parallelism", 1)
    cli("submit", run_dir, check=True)
    node = subprocess.run(["sinfo", "-h", "-o", "%N"], capture_output=True, text=True, check=True).stdout.strip()
    deadline = time.time() + 120
    while time.time() < deadline and "RUNNING" not in cli("status", run_dir).stdout:
        time.sleep(1)
    subprocess.run(["scontrol", "update", f"nodename={node}", "state=down", "reason=hpc-rerun-test"], check=True)
    time.sleep(5)
    # With ReturnToService=2 the live slurmd brings the node back by itself; resume in case it has not.
    subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"], check=False, capture_output=True)
    env = {"HPC_RERUN_LOST_GRACE_S": "5"}
    status = wait_finished(run_dir, 300, env=env)
    # The node going down must have cost the run something, or this test tests nothing: Slurm requeued the
    # element it killed (NODE_FAIL / REQUEUED in the job's history), or the run has a shard to resubmit.
    array = json.loads((run_dir / "plan.json").read_text())["attempts"][0]["jobs"]["0"].split("_")[0]
    history = subprocess.run(["sacct", "-D", "-n", "-P", "-X", "-j", array, "-o", "JobID,State"],
                             capture_output=True, text=True).stdout
    assert status["summary"]["needs_rerun"] or "NODE_FAIL" in history or "REQUEUE" in history, history
    if status["summary"]["needs_rerun"]:
        cli("resubmit", run_dir, env=env, check=True)
        status = wait_finished(run_dir, 300, env=env)
    assert status["summary"]["done"] == status["summary"]["total"]
    cli("merge-shards", run_dir, check=True)
    assert_tree_complete(demo_paths)


@pytest.mark.slurm
@pytest.mark.timeout(420)
def test_element_signalled_before_its_time_limit_requeues_itself_and_resumes(slurm_cluster, demo_paths):
    """What Slurm does before a time limit (and on preemption): USR2 to the running element. It
    checkpoints, requeues itself, restarts, and resumes from its shard file: no task twice, none lost.
    The signal is sent with scancel --signal=USR2 so the moment is certain (a real 1-2 minute limit
    makes the test a race against the machine's speed)."""
    (demo_paths["root"] / "model").rename(demo_paths["root"] / "answering-model")
    from hpc_rerun.tinymodel import build_tiny_qwen3vl

    build_tiny_qwen3vl(demo_paths["root"] / "model")  # random: it talks until max_new_tokens
    run_dir = plan_demo(demo_paths, 1)
    spec_path = run_dir / "attempt-1" / "shard-0000.json"
    spec = json.loads(spec_path.read_text())
    spec.update(batch_tokens=1, generation={"do_sample": False, "max_new_tokens": 300, "min_new_tokens": 300})
    spec_path.write_text(json.dumps(spec))
    cli("submit", run_dir, check=True)
    job = json.loads((run_dir / "plan.json").read_text())["attempts"][0]["jobs"]["0"]
    shard_file = spec_path.with_suffix(".jsonl")
    deadline = time.time() + 180
    while time.time() < deadline and (not shard_file.exists() or len(read_records(shard_file)) < 2):
        time.sleep(0.5)
    done_before = len(read_records(shard_file))
    assert 2 <= done_before < len(spec["tasks"]), "signalled mid-shard"
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    status = wait_finished(run_dir, 300, env={"HPC_RERUN_LOST_GRACE_S": "30"})
    assert status["summary"]["done"] == status["summary"]["total"] == len(spec["tasks"])
    assert [s["state"] for s in status["shards"]] == ["COMPLETED"], "one element, requeued, not resubmitted"
    records = read_records(shard_file)
    keys = [(r["provenance"]["config"], r["id"]) for r in records]
    assert len(keys) == len(set(keys)) == len(spec["tasks"]), "no task answered twice across the requeue"
    restarts = [r["provenance"]["slurm_restart_count"] for r in records]
    assert restarts[0] == 0 and restarts[-1] >= 1, "resumed in the requeued run"
