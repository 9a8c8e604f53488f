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
from hpc_rerun.rundir import ShardSpec, read_records

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
    talkative_model(demo_paths)
    run_dir = plan_demo(demo_paths, 1)
    [spec_path] = slow_specs(run_dir)
    spec = json.loads(spec_path.read_text())
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


def reconfigure(max_array_size: int | None) -> None:
    """Apply a MaxArraySize to the live dev cluster (None: Slurm's default again)."""
    env = {**os.environ, "HPC_RERUN_SLURM_MAX_ARRAY_SIZE": str(max_array_size or 1001)}
    proc = subprocess.run([str(DEV_CLUSTER), "reconfigure"], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    shown = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, check=True).stdout
    assert f"MaxArraySize            = {max_array_size or 1001}" in shown


@pytest.mark.slurm
@pytest.mark.timeout(480)
def test_more_shards_than_max_array_size_go_out_as_several_arrays(slurm_cluster, demo_paths):
    """MaxArraySize 3: seven shards go out as three arrays (3 + 3 + 1, indices below 3), status watches
    all of them, an element of the second array that is cancelled is resubmitted, and the merge completes."""
    reconfigure(3)
    try:
        run_dir = plan_demo(demo_paths, 7)
        cli("submit", run_dir, check=True)
        jobs = json.loads((run_dir / "plan.json").read_text())["attempts"][0]["jobs"]
        arrays: dict[str, list[int]] = {}
        for shard in sorted(jobs, key=int):  # a lone last shard goes out as a plain job (submitit's way)
            array, _, index = jobs[shard].partition("_")
            arrays.setdefault(array, []).append(int(index or 0))
        assert sorted(arrays.values()) == [[0], [0, 1, 2], [0, 1, 2]], jobs
        assert jobs["4"] == f"{sorted(arrays, key=int)[1]}_1"
        subprocess.run(["scancel", jobs["4"]], check=True)
        env = {"HPC_RERUN_LOST_GRACE_S": "5"}
        status = wait_finished(run_dir, 300, env=env)
        states = {s["shard"]: s["state"] for s in status["shards"]}
        # Slurm keeps no record of an element cancelled while pending in its array's remainder: absent from
        # sacct and squeue, it is LOST after the grace period; once it ran, CANCELLED. Either needs a rerun.
        assert states[4] in ("CANCELLED", "LOST") and status["summary"]["needs_rerun"] == 1, states
        assert sum(state == "COMPLETED" for state in states.values()) == 6, "every array was watched to its end"
        cli("resubmit", run_dir, env=env, check=True)
        status = wait_finished(run_dir, 300, env=env)
        assert status["summary"]["done"] == status["summary"]["total"], status["summary"]
    finally:
        reconfigure(None)
    cli("merge-shards", run_dir, check=True)
    assert_tree_complete(demo_paths)


def profile_with(tmp_path: Path, **settings) -> Path:
    """The dev-cluster profile with some settings changed."""
    lines = [line for line in PROFILE.read_text().splitlines() if line.split("=")[0].strip() not in settings]
    path = tmp_path / "profile.toml"
    path.write_text("\n".join(lines + [f"{key} = {value}" for key, value in settings.items()]) + "\n")
    return path


@pytest.mark.slurm
@pytest.mark.timeout(480)
def test_a_shard_past_its_time_limit_is_resubmitted_with_twice_the_time_in_smaller_shards(
        slurm_cluster, demo_paths, tmp_path):
    """A real Slurm time limit: the task list hangs (a FIFO nobody writes, as a stalled file system does;
    the worker reads it first, in its own code), Slurm signals the one-minute element before its limit, and
    with ``max_requeues = 0`` it does not requeue itself but ends (Slurm books it FAILED, submitit's result
    says timed out: status calls it TIMEOUT; killed at the limit, Slurm says TIMEOUT itself). resubmit
    plans twice the time and twice the shards, Slurm runs them with that limit, and the merge completes."""
    # USR2 20 s before the limit, not at start-up (before submitit has put its handler in place)
    profile = profile_with(tmp_path, time_min=1, max_requeues=0, signal_delay_s=20)
    run_dir = plan_demo(demo_paths, 1, "--profile", profile)
    task_list = Path(json.loads((run_dir / "attempt-1" / "shard-0000.json").read_text())["task_list"])
    saved = task_list.read_bytes()
    task_list.unlink()
    os.mkfifo(task_list)
    try:
        cli("submit", run_dir, check=True)
        status = wait_finished(run_dir, 240)
    finally:
        task_list.unlink()
        task_list.write_bytes(saved)
    assert [s["state"] for s in status["shards"]] == ["TIMEOUT"], status["shards"]
    cli("resubmit", run_dir, check=True)
    second = json.loads((run_dir / "plan.json").read_text())["attempts"][1]
    assert second["slurm"]["time_min"] == 2 and len(second["shards"]) == 2 and second["causes"] == ["TIMEOUT"]
    arrays = sorted({job.split("_")[0] for job in second["jobs"].values()})
    limits = subprocess.run(["squeue", "-h", "-r", "-j", ",".join(arrays), "-o", "%l"], capture_output=True,
                            text=True, check=True).stdout.split()
    assert limits == ["2:00"] * 2, (arrays, limits)  # as Slurm holds them, right after submission
    status = wait_finished(run_dir, 300)
    assert status["summary"]["done"] == status["summary"]["total"], status["summary"]
    cli("merge-shards", run_dir, check=True)
    assert_tree_complete(demo_paths)


INJECTED_OOM = '''
"""Loaded by every Python the test's Slurm jobs start (PYTHONPATH): the GPU runs out of memory on an image of
more than {limit} pixels. A CPU has no CUDA OOM: the worker gets the real exception class, as from a GPU."""
import os

if os.environ.get("SLURM_JOB_ID"):
    import torch

    from hpc_rerun.inference import engine

    generate = engine.Engine.generate_encoded

    def out_of_memory_on_large_images(self, encoded):
        for prompt in encoded.prompts or []:
            if prompt.image_grid_thw is not None and int(prompt.image_grid_thw.prod()) * 16 * 16 > {limit}:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test)")
        return generate(self, encoded)

    engine.Engine.generate_encoded = out_of_memory_on_large_images
'''


@pytest.mark.slurm
@pytest.mark.timeout(480)
def test_retry_errors_reruns_an_out_of_memory_at_half_its_pixels_and_tokens(slurm_cluster, demo_paths, tmp_path):
    """Images of more than 100K pixels run out of GPU memory (injected; see INJECTED_OOM). In the first
    attempt the worker halves the pixels (and an image + text prompt's tokens) up to three times: the
    980x296 images get through, the image + table tasks of the 1120x978 one end as an OOM error.
    ``resubmit --retry-errors`` reruns those at half the pixels and tokens of their last try, in a real
    array, and they are answered; the merge completes the tree."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(INJECTED_OOM.format(limit=100_000))
    env = {"PYTHONPATH": f"{hook}:{os.environ.get('PYTHONPATH', '')}"}
    run_dir = plan_demo(demo_paths, 2)
    cli("submit", run_dir, env=env, check=True)
    wait_finished(run_dir, 300)
    first = {(r["provenance"]["config"], r["id"]): r for path in (run_dir / "attempt-1").glob("*.jsonl")
             for r in read_records(path)}
    failed = {key: r for key, r in first.items() if r["provenance"]["error_class"] in ("oom_text", "oom_image")}
    assert {config for config, _ in failed} == {"qwen3vl_default_pic/mix_markdown"}, first
    # Three halvings, or two where the prompt around the table (which keeps room for the answer protocol's
    # re-ask note) no longer fits the halved budget: either way the ladder ran and the image stayed too large.
    assert all(r["provenance"]["image_pixels"] > 100_000 and r["provenance"]["retries"] in (2, 3)
               for r in failed.values())
    assert any(r["provenance"]["retries"] for key, r in first.items() if key not in failed and r["provenance"][
        "image_pixels"]), "smaller images got through after the worker halved their pixels"
    cli("resubmit", run_dir, "--retry-errors", env=env, check=True)
    second = [ShardSpec.read(p) for p in sorted((run_dir / "attempt-2").glob("shard-*.json"))]
    entries = {(t["config"], t["id"]): t for spec in second for t in spec.tasks}
    assert set(entries) == set(failed)
    for key, record in failed.items():
        provenance = record["provenance"]
        assert entries[key]["max_pixels"] == provenance["image_pixels"] // 2
        tokens = provenance["truncated_to_tokens"] or provenance["prompt_tokens"]
        assert entries[key]["token_budget"] == max(tokens // 2, 1024)
    status = wait_finished(run_dir, 300)
    assert status["summary"]["done"] == status["summary"]["total"]
    answered = {(r["provenance"]["config"], r["id"]): r for path in (run_dir / "attempt-2").glob("*.jsonl")
                for r in read_records(path)}
    for key in failed:
        provenance = answered[key]["provenance"]
        assert provenance["error_class"] is None and provenance["image_pixels"] <= 100_000, provenance
    cli("merge-shards", run_dir, check=True)
    assert_tree_complete(demo_paths)


@pytest.mark.slurm
@pytest.mark.timeout(420)
def test_a_shard_killed_for_host_memory_is_resubmitted_with_more_memory(slurm_cluster, demo_paths, tmp_path):
    """OUT_OF_MEMORY needs cgroup memory enforcement, which this dev cluster cannot have (no cgroup
    controllers in a container): the element really runs and is cancelled, and a wrapper on PATH reports
    it to sacct's readers as OUT_OF_MEMORY (the one faked part). resubmit gives the rerun 1.5x the memory,
    Slurm holds the new attempt with it, and the run completes."""
    run_dir = plan_demo(demo_paths, 1, "--profile", profile_with(tmp_path, mem_gb=2))
    cli("submit", run_dir, check=True)
    job = json.loads((run_dir / "plan.json").read_text())["attempts"][0]["jobs"]["0"]
    subprocess.run(["scancel", job], check=True)
    wrappers = tmp_path / "bin"
    wrappers.mkdir()
    real = shutil.which("sacct")
    (wrappers / "sacct").write_text(  # rows: JobID|JobName|Submit|State
        f"#!/bin/sh\n{real} \"$@\" | sed 's/^\\({job}|[^|]*|[^|]*\\)|CANCELLED.*/\\1|OUT_OF_MEMORY/'\n")
    (wrappers / "sacct").chmod(0o755)
    env = {"PATH": f"{wrappers}:{os.environ['PATH']}", "HPC_RERUN_LOST_GRACE_S": "5"}
    status = wait_finished(run_dir, 120, env=env)
    assert [s["state"] for s in status["shards"]] == ["OUT_OF_MEMORY"], status["shards"]
    cli("resubmit", run_dir, env=env, check=True)
    second = json.loads((run_dir / "plan.json").read_text())["attempts"][1]
    assert second["slurm"]["mem_gb"] == 3 and second["causes"] == ["OUT_OF_MEMORY"]
    arrays = sorted({j.split("_")[0] for j in second["jobs"].values()})
    held = subprocess.run(["squeue", "-h", "-r", "-j", ",".join(arrays), "-o", "%m"], capture_output=True,
                          text=True, check=True).stdout.split()
    assert held and set(held) == {"3G"}, held
    status = wait_finished(run_dir, 300, env=env)
    assert status["summary"]["done"] == status["summary"]["total"]
    cli("merge-shards", run_dir, check=True)
    assert_tree_complete(demo_paths)


def talkative_model(paths) -> None:
    """Swap the demo's always-'Yes' model for a random one: it talks until max_new_tokens, so tasks are slow."""
    from hpc_rerun.inference.tinymodel import build_tiny_qwen3vl

    (paths["root"] / "model").rename(paths["root"] / "answering-model")
    build_tiny_qwen3vl(paths["root"] / "model")


def slow_specs(run_dir: Path, new_tokens: int = 300) -> list[Path]:
    """One task per batch, ``new_tokens`` each: a shard runs long enough to be interrupted mid-way."""
    specs = sorted((run_dir / "attempt-1").glob("shard-*.json"))
    for path in specs:
        spec = json.loads(path.read_text())
        spec.update(batch_tokens=1, generation={"do_sample": False, "max_new_tokens": new_tokens,
                                                "min_new_tokens": new_tokens})
        path.write_text(json.dumps(spec))
    return specs


def assert_each_task_answered_once(run_dir: Path) -> None:
    keys = [(r["provenance"]["config"], r["id"]) for path in run_dir.glob("attempt-*/shard-*.jsonl")
            for r in read_records(path)]
    assert len(keys) == len(set(keys)), "a task answered twice"


@pytest.mark.slurm
@pytest.mark.timeout(540)
def test_elements_preempted_by_higher_priority_work_are_requeued_and_resume(slurm_cluster, demo_paths):
    """The run's two elements (8-9 slow tasks each) hold two of the node's four GPUs; a job in the urgent
    partition (PriorityTier 10, slurm/dev-cluster) asks for all four. Slurm preempts both (PreemptMode=
    REQUEUE): killed, requeued, started again once the urgent job is done. status says so while it lasts;
    each element resumes past its shard file; the run completes with every task answered once, and nothing
    is resubmitted."""
    talkative_model(demo_paths)
    run_dir = plan_demo(demo_paths, 2)
    specs = slow_specs(run_dir)
    cli("submit", run_dir, check=True)
    deadline = time.time() + 180
    while time.time() < deadline and not all(len(read_records(p.with_suffix(".jsonl"))) >= 1 for p in specs):
        time.sleep(0.5)
    before = {p.name: len(read_records(p.with_suffix(".jsonl"))) for p in specs}
    assert all(n >= 1 for n in before.values()), f"every element answered a task before: {before}"
    urgent = subprocess.run(["sbatch", "--parsable", "-p", "urgent", "--gres=gpu:a100:4", "-o", "/dev/null",
                             "-J", "urgent", "--wrap", "sleep 20"], capture_output=True, text=True, check=True)
    notes, deadline = set(), time.time() + 420
    while time.time() < deadline:
        status = json.loads(cli("status", run_dir, "--json", env={"HPC_RERUN_LOST_GRACE_S": "30"}).stdout)
        notes |= {(s["shard"], s["note"]) for s in status["shards"] if s["note"]}
        if status["summary"]["finished"]:
            break
        time.sleep(1)
    assert status["summary"]["finished"], "the run finished after the urgent job"
    array = json.loads((run_dir / "plan.json").read_text())["attempts"][0]["jobs"]["0"].split("_")[0]
    history = subprocess.run(["sacct", "-D", "-n", "-P", "-X", "-j", array, "-o", "JobID,State"],
                             capture_output=True, text=True).stdout
    assert history.count("PREEMPTED") == 2, history
    assert {shard for shard, note in notes if "preempted" in note} == {0, 1}, notes
    assert status["summary"]["done"] == status["summary"]["total"] and not status["summary"]["needs_rerun"]
    assert [s["state"] for s in status["shards"]] == ["COMPLETED"] * 2
    assert_each_task_answered_once(run_dir)
    restarted = [r["provenance"]["slurm_restart_count"] for p in specs for r in read_records(p.with_suffix(".jsonl"))]
    assert max(restarted) >= 1, "the rest was answered by the requeued runs"
    subprocess.run(["scancel", urgent.stdout.strip()], check=False)


SLOW_MODEL_LOAD = '''
import os
import time
from pathlib import Path

if os.environ.get("SLURM_JOB_ID") and os.environ.get("SLURM_RESTART_COUNT", "0") == "0":
    from hpc_rerun.inference import engine

    load = engine.Engine.__init__

    def slow_load(self, *args, **kwargs):
        Path("{marker}").touch()
        try:  # as model loading code does: a broad except around the slow part
            time.sleep(20)
        except Exception:
            pass
        load(self, *args, **kwargs)

    engine.Engine.__init__ = slow_load
'''


@pytest.mark.slurm
@pytest.mark.timeout(420)
def test_element_signalled_while_it_loads_the_model_is_requeued_not_lost(slurm_cluster, demo_paths, tmp_path):
    """USR2 (a time-limit warning, or a preemption) while the element still loads its model, before it has
    answered anything: submitit's handler runs once loading is done, the element requeues itself and the
    requeued run answers every task. The load is made slow (20 s inside a broad except, as loading code has)
    by a sitecustomize on the job's PYTHONPATH, in the first run only: an 8B model takes a minute to load."""
    marker = tmp_path / "loading"
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SLOW_MODEL_LOAD.format(marker=marker))
    env = {"PYTHONPATH": f"{hook}:{os.environ.get('PYTHONPATH', '')}"}
    run_dir = plan_demo(demo_paths, 1)
    cli("submit", run_dir, env=env, check=True)
    job = json.loads((run_dir / "plan.json").read_text())["attempts"][0]["jobs"]["0"]
    deadline = time.time() + 120
    while time.time() < deadline and not marker.exists():
        time.sleep(0.2)
    assert marker.exists(), "the element started loading the model"
    shard_file = run_dir / "attempt-1" / "shard-0000.jsonl"
    assert not read_records(shard_file), "signalled before any answer"
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    status = wait_finished(run_dir, 300, env={"HPC_RERUN_LOST_GRACE_S": "30"})
    assert [s["state"] for s in status["shards"]] == ["COMPLETED"], status["shards"]
    assert status["summary"]["done"] == status["summary"]["total"]
    records = read_records(shard_file)
    assert {r["provenance"]["slurm_restart_count"] for r in records} == {1}, "all answered by the requeued run"
    assert_each_task_answered_once(run_dir)


@pytest.mark.slurm
@pytest.mark.timeout(420)
def test_status_reads_its_own_jobs_after_the_cluster_forgot_them_and_reused_their_ids(slurm_cluster, demo_paths):
    """slurmctld loses its state (slurm/dev-cluster reset-jobs): job ids start again at the run's own array
    id, and another user's array gets that id and fails. sacct now answers for both; status must read the
    run's own records (its job name, its submission time) and say COMPLETED, not the stranger's FAILED."""
    run_dir = plan_demo(demo_paths, 2)
    cli("submit", run_dir, check=True)
    assert [s["state"] for s in wait_finished(run_dir, 300)["shards"]] == ["COMPLETED"] * 2
    array = json.loads((run_dir / "plan.json").read_text())["attempts"][0]["jobs"]["0"].split("_")[0]
    subprocess.run([str(DEV_CLUSTER), "reset-jobs"], env={**os.environ, "HPC_RERUN_SLURM_FIRST_JOB_ID": array},
                   check=True, capture_output=True, timeout=120)
    stranger = subprocess.run(["sbatch", "--parsable", "--array=0-1", "-J", "stranger", "-o", "/dev/null",
                               "--wrap", "exit 3"], capture_output=True, text=True, check=True).stdout.strip()
    assert stranger == array, "the id was reused"
    deadline = time.time() + 60
    while time.time() < deadline and subprocess.run(["squeue", "-h", "-j", stranger], capture_output=True,
                                                    text=True).stdout.strip():
        time.sleep(0.5)
    latest = subprocess.run(["sacct", "-n", "-P", "-X", "-j", array, "-o", "JobID,JobName,State"],
                            capture_output=True, text=True).stdout
    assert "stranger|FAILED" in latest, f"sacct answers for the stranger now: {latest}"
    status = json.loads(cli("status", run_dir, "--json").stdout)
    assert [s["state"] for s in status["shards"]] == ["COMPLETED"] * 2, status["shards"]
    assert status["summary"]["finished"] and not status["summary"]["needs_rerun"]


@pytest.fixture
def two_nodes(slurm_cluster):
    """The dev cluster restarted with a second node (HPC_RERUN_SLURM_NODES=2: its own slurmd in its own
    network and UTS namespace), and back to one node afterwards. Returns the two node names."""
    def restart(nodes: int) -> None:
        env = {**os.environ, "HPC_RERUN_SLURM_NODES": str(nodes)}
        subprocess.run([str(DEV_CLUSTER), "stop"], env=env, check=True, capture_output=True, timeout=120)
        subprocess.run([str(DEV_CLUSTER), "start"], env=env, check=True, capture_output=True, timeout=300)

    restart(2)
    try:
        names = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True,
                               check=True).stdout.split()
        yield sorted(set(names), key=len)
    finally:
        restart(1)


@pytest.mark.slurm
@pytest.mark.timeout(600)
def test_a_node_that_fails_under_a_run_leaves_it_to_finish_on_the_other(two_nodes, demo_paths):
    """Two elements, each asking for a whole node's four GPUs, run one per node (their records name their
    hosts). The second node goes DOWN under its element: Slurm kills it (NODE_FAIL), and the rest of its
    shard is answered on the first node, by Slurm's requeue or by resubmit; every task once."""
    first, second = two_nodes
    talkative_model(demo_paths)
    run_dir = plan_demo(demo_paths, 2, "--gres", "gpu:a100:4")
    specs = slow_specs(run_dir)
    cli("submit", run_dir, check=True)
    deadline = time.time() + 180
    while time.time() < deadline and not all(read_records(p.with_suffix(".jsonl")) for p in specs):
        time.sleep(0.5)
    hosts = {p: {r["provenance"]["host"] for r in read_records(p.with_suffix(".jsonl"))} for p in specs}
    assert sorted(h for hs in hosts.values() for h in hs) == sorted([first, second]), hosts
    [on_second] = [p for p, hs in hosts.items() if hs == {second}]
    answered_there = len(read_records(on_second.with_suffix(".jsonl")))
    subprocess.run(["scontrol", "update", f"nodename={second}", "state=down", "reason=hpc-rerun-test"], check=True)
    env = {"HPC_RERUN_LOST_GRACE_S": "10"}
    seen, deadline = set(), time.time() + 420
    while time.time() < deadline:
        status = json.loads(cli("status", run_dir, "--json", env=env).stdout)
        seen |= {(s["state"], s["note"]) for s in status["shards"]}
        if status["summary"]["finished"]:
            break
        time.sleep(1)
    if status["summary"]["needs_rerun"]:
        cli("resubmit", run_dir, env=env, check=True)
        status = wait_finished(run_dir, 300, env=env)
    assert any(state == "NODE_FAIL" or "node failure" in (note or "") for state, note in seen), seen
    assert status["summary"]["done"] == status["summary"]["total"]
    assert_each_task_answered_once(run_dir)
    its_tasks = {(t["config"], t["id"]) for t in json.loads(on_second.read_text())["tasks"]}
    later = [r for path in run_dir.glob("attempt-*/shard-*.jsonl") for r in read_records(path)
             if (r["provenance"]["config"], r["id"]) in its_tasks and r["provenance"]["host"] == first]
    assert answered_there < len(its_tasks) and later, "the rest of its shard ran on the first node"
