"""plan -> submit -> status -> resubmit -> merge on the real dev Slurm cluster (and the local executor).

Every CLI call is a separate process, as a user's would be: the run is reattached from its directory.
Each test has a hard time limit; waiting loops are bounded.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpc_rerun.plan import TaskCost, pack_shards

from .conftest import max_overlap

HPC_RERUN = [sys.executable, "-m", "hpc_rerun.cli"]
PROFILE = Path(__file__).parent.parent / "slurm" / "profiles" / "dev-cluster.toml"


def cli(*args, check=True, timeout=120, env=None) -> subprocess.CompletedProcess:
    proc = subprocess.run([*HPC_RERUN, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if check:
        assert proc.returncode == 0, f"{args}: {proc.stdout}\n{proc.stderr}"
    return proc


def status_json(run_dir, env=None) -> dict:
    return json.loads(cli("status", run_dir, "--json", check=False, env=env).stdout)


def wait_until(predicate, limit_s: float, what: str):
    deadline = time.time() + limit_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    pytest.fail(f"timed out after {limit_s:.0f} s waiting for {what}")


def plan_run(bench, tiny_model_dir, shards: int, *extra) -> Path:
    cli("plan", bench["results"], "--data-root", bench["data"], "--tasks", bench["tasks"], "--model", tiny_model_dir,
        "--shards", shards, "--greedy", "--max-new-tokens", 4, "--token-budget", 4096, "--logs", bench["logs"],
        "--run-id", "run", "--profile", PROFILE, *extra, timeout=300)
    return bench["logs"] / "run"


def all_records(run_dir: Path) -> list[dict]:
    from hpc_rerun.rundir import read_records

    return [r for path in sorted(run_dir.glob("attempt-*/shard-*.jsonl")) for r in read_records(path)]



@pytest.mark.slurm
@pytest.mark.timeout(420)
def test_eight_shards_on_four_fake_gpus(slurm_cluster, gappy_benchmark, tiny_model_dir):
    run_dir = plan_run(gappy_benchmark, tiny_model_dir, 8, "--array-parallelism", 8)
    plan = json.loads((run_dir / "plan.json").read_text())
    assert len(plan["attempts"][0]["shards"]) == 8
    out = cli("submit", run_dir).stdout
    assert "submitted as job array" in out and f"hpc-rerun status {run_dir}" in out
    # A new process reattaches from the run directory alone.
    final = wait_until(lambda: (s := status_json(run_dir))["summary"]["finished"] and s, 300, "the array to finish")
    assert final["summary"]["done"] == final["summary"]["total"] == len(gappy_benchmark["runnable"])
    assert {s["state"] for s in final["shards"]} == {"COMPLETED"}
    records = all_records(run_dir)
    assert sorted(r["id"] for r in records) == gappy_benchmark["runnable"]
    assert all(r["provenance"]["slurm_array_job_id"] for r in records)
    array = json.loads((run_dir / "plan.json").read_text())["attempts"][0]["jobs"]["0"].split("_")[0]
    sacct = subprocess.run(["sacct", "-n", "-P", "-X", "-j", array, "-o", "JobID,Start,End"], capture_output=True,
                           text=True, check=True).stdout
    intervals = []
    for line in sacct.splitlines():
        _, start, end = line.split("|")
        intervals.append((start, end))
    assert len(intervals) == 8
    assert max_overlap(intervals) <= 4, "4 fake GPUs: never more than 4 elements at once"

    merged = cli("merge-shards", run_dir)
    assert "text_json" in merged.stdout
    items = json.loads((gappy_benchmark["results"] / "qwen3vl_text/text_json/results.json").read_text())["results"]
    assert {i["id"] for i in items} >= set(gappy_benchmark["runnable"])


@pytest.mark.slurm
@pytest.mark.timeout(480)
def test_cancelled_lost_and_failed_elements_are_named_and_resubmit_completes(slurm_cluster, gappy_benchmark,
                                                                            tiny_model_dir):
    run_dir = plan_run(gappy_benchmark, tiny_model_dir, 4, "--array-parallelism", 1)
    plan = json.loads((run_dir / "plan.json").read_text())
    broken_spec = run_dir / plan["attempts"][0]["shards"][1]["spec"]
    spec = json.loads(broken_spec.read_text())
    spec["model"] = "/nonexistent/model"  # e.g. a model path the compute node cannot see: the element fails
    broken_spec.write_text(json.dumps(spec))
    cli("submit", run_dir)
    jobs = json.loads((run_dir / "plan.json").read_text())["attempts"][0]["jobs"]
    subprocess.run(["scancel", jobs["2"]], check=True)  # still pending inside the array: it vanishes
    wait_until(lambda: status_json(run_dir)["shards"][0]["state"] == "RUNNING", 120, "element 0 to run")
    subprocess.run(["scancel", jobs["0"]], check=True)
    env = {"HPC_RERUN_LOST_GRACE_S": "5"}
    final = wait_until(lambda: (s := status_json(run_dir, env))["summary"]["finished"] and s, 300, "the array")
    states = {s["shard"]: s["state"] for s in final["shards"]}
    assert states == {0: "CANCELLED", 1: "FAILED", 2: "LOST", 3: "COMPLETED"}, states
    assert final["summary"]["needs_rerun"] == 3

    answered = {(r["provenance"]["config"], r["id"]) for r in all_records(run_dir)}
    planned = {(t["config"], t["id"]) for s in plan["attempts"][0]["shards"]
               for t in json.loads((run_dir / s["spec"]).read_text())["tasks"]}
    out = cli("resubmit", run_dir, env=env).stdout
    assert "attempt 2" in out and "CANCELLED" in out and "FAILED" in out and "LOST" in out
    attempt2 = json.loads((run_dir / "plan.json").read_text())["attempts"][1]
    rerun = {(t["config"], t["id"]) for s in attempt2["shards"]
             for t in json.loads((run_dir / s["spec"]).read_text())["tasks"]}
    assert rerun == planned - answered, "exactly the missing tasks"
    done = wait_until(lambda: (s := status_json(run_dir, env))["summary"]["finished"] and s, 300, "attempt 2")
    assert done["summary"]["done"] == done["summary"]["total"] == len(planned)
    assert done["summary"]["needs_rerun"] == 0
    assert cli("status", run_dir, env=env).returncode == 0


@pytest.mark.timeout(300)
def test_local_executor_runs_the_same_shards(gappy_benchmark, tiny_model_dir, no_slurm_path):
    run_dir = plan_run(gappy_benchmark, tiny_model_dir, 2)
    no_slurm = cli("submit", run_dir, check=False)
    assert no_slurm.returncode == 3 and "--executor local" in no_slurm.stderr, "never a silent local fall-back"
    out = cli("submit", run_dir, "--executor", "local", "--parallel", 2).stdout
    assert "running locally" in out
    final = wait_until(lambda: (s := status_json(run_dir))["summary"]["finished"] and s, 240, "the local pool")
    assert {s["state"] for s in final["shards"]} == {"COMPLETED"}
    assert sorted(r["id"] for r in all_records(run_dir)) == gappy_benchmark["runnable"]
    assert all(r["provenance"]["slurm_job_id"] is None for r in all_records(run_dir))


@pytest.mark.timeout(300)
def test_local_workers_each_get_their_own_gpu_and_their_own_cpus(gappy_benchmark, tiny_model_dir):
    """Two GPUs as CUDA_VISIBLE_DEVICES lists them (on this CPU-only machine a worker given one id finds no
    usable GPU and runs on the CPU, the pinning is the same): one worker per GPU, each of its records naming
    that one id and the CPUs it was held to, the two shares disjoint, so the prompt-preparing threads of
    workers on one host do not compete for the same cores."""
    run_dir = plan_run(gappy_benchmark, tiny_model_dir, 2)
    cli("submit", run_dir, "--executor", "local", env={"CUDA_VISIBLE_DEVICES": "0,1"})
    final = wait_until(lambda: (s := status_json(run_dir))["summary"]["finished"] and s, 240, "the local pool")
    assert {s["state"] for s in final["shards"]} == {"COMPLETED"}
    seen: dict[int, set] = {}
    for record in all_records(run_dir):
        provenance = record["provenance"]
        seen.setdefault(provenance["shard"], set()).add((provenance["cuda_visible_devices"], provenance["cpus"]))
    assert len(seen) == 2 and all(len(pairs) == 1 for pairs in seen.values()), seen
    (gpu_a, cpus_a), (gpu_b, cpus_b) = (next(iter(pairs)) for pairs in seen.values())
    assert sorted([gpu_a, gpu_b]) == ["0", "1"], "each worker sees its own GPU and only it"

    def cpu_set(ranges: str) -> set[int]:
        return {n for part in ranges.split(",") for n in range(int(part.split("-")[0]), int(part.split("-")[-1]) + 1)}

    if len(os.sched_getaffinity(0)) >= 2:
        assert not cpu_set(cpus_a) & cpu_set(cpus_b), (cpus_a, cpus_b)
        assert cpu_set(cpus_a) | cpu_set(cpus_b) == os.sched_getaffinity(0), "together they have all the CPUs"


def test_plan_dry_run_shows_shards_and_sbatch_options_and_writes_nothing(gappy_benchmark, tiny_model_dir):
    out = cli("plan", gappy_benchmark["results"], "--data-root", gappy_benchmark["data"], "--tasks",
              gappy_benchmark["tasks"], "--model", tiny_model_dir, "--shards", 3, "--logs", gappy_benchmark["logs"],
              "--partition", "gpu", "--gres", "gpu:a100:1", "--time-min", 90, "--sbatch", "constraint=a100_80gb",
              "--dry-run", "--json").stdout
    plan = json.loads(out)
    assert plan["run_dir"] is None and not gappy_benchmark["logs"].exists()
    assert plan["tasks"] == len(gappy_benchmark["runnable"]) and plan["shards"] == 3
    assert sum(row["tasks"] for row in plan["shard_table"]) == plan["tasks"]
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gres=gpu:a100:1", "#SBATCH --time=90",
                 "#SBATCH --constraint=a100_80gb", "#SBATCH --array=0-2%3"):
        assert line in plan["sbatch"], plan["sbatch"]


def test_shards_are_balanced_on_realistic_costs():
    """Costs shaped like the real gaps (many small tasks, a few long tables): max/mean <= 1.10."""
    rng = random.Random(3)
    for n_shards in (2, 4, 8, 16):
        costs = [TaskCost("c", i, 0, rng.lognormvariate(2.0, 0.8)) for i in range(147)]
        mean = sum(c.seconds for c in costs) / n_shards
        costs = [c for c in costs if c.seconds <= mean / 2]
        shards = pack_shards(costs, n_shards)
        loads = [sum(c.seconds for c in s) for s in shards]
        assert sorted(c.id for s in shards for c in s) == sorted(c.id for c in costs), "every task exactly once"
        assert max(loads) / (sum(loads) / len(loads)) <= 1.10, (n_shards, loads)


def test_unknown_profile_key_is_an_error(tmp_path, gappy_benchmark, tiny_model_dir):
    profile = tmp_path / "site.toml"
    profile.write_text('partition = "gpu"\ngpus_per_node = 4\n')
    proc = cli("plan", gappy_benchmark["results"], "--data-root", gappy_benchmark["data"], "--tasks",
               gappy_benchmark["tasks"], "--model", tiny_model_dir, "--profile", profile, "--dry-run", check=False)
    assert proc.returncode == 2 and "unknown key(s) gpus_per_node" in proc.stderr


@pytest.mark.timeout(240)
def test_cancel_stops_a_local_run_and_status_says_so(gappy_benchmark, tiny_model_dir):
    run_dir = plan_run(gappy_benchmark, tiny_model_dir, 1)
    spec_path = run_dir / "attempt-1" / "shard-0000.json"
    spec = json.loads(spec_path.read_text())
    spec["generation"] = {"do_sample": False, "max_new_tokens": 5000, "min_new_tokens": 5000}  # minutes of work
    spec_path.write_text(json.dumps(spec))
    cli("submit", run_dir, "--executor", "local")
    wait_until(lambda: status_json(run_dir)["shards"][0]["state"] == "RUNNING", 60, "the shard to run")
    pool = json.loads((run_dir / "plan.json").read_text())["attempts"][0]["pool_pid"]
    assert f"local pool {pool}" in cli("cancel", run_dir).stdout
    final = wait_until(lambda: (s := status_json(run_dir))["summary"]["finished"] and s, 60, "the cancel")
    assert final["shards"][0]["state"] == "CANCELLED"
    assert final["summary"]["needs_rerun"] == 1, "resubmit would pick it up"
    workers = [p for p in os.listdir("/proc") if p.isdigit() and str(spec_path) in _cmdline(p)]
    assert workers == [], "no worker left running"


def _cmdline(pid: str) -> str:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.slurm
@pytest.mark.timeout(240)
def test_status_asks_slurm_once_per_round_whatever_the_size_of_the_run(slurm_cluster, gappy_benchmark,
                                                                       tiny_model_dir, tmp_path):
    """A run of 250 array elements (a real array on the dev cluster, trivial jobs): one status round is one
    sacct and one squeue call, counted by wrappers on PATH, and every element gets a state."""
    from hpc_rerun.atomic import atomic_write_json
    from hpc_rerun.rundir import RunDir

    run_dir = plan_run(gappy_benchmark, tiny_model_dir, 1)
    plan = json.loads((run_dir / "plan.json").read_text())
    one = plan["attempts"][0]["shards"][0]
    plan["attempts"][0]["shards"] = [dict(one, shard=n) for n in range(250)]
    atomic_write_json(run_dir / "plan.json", plan)
    array = subprocess.run(["sbatch", "--parsable", "--array=0-249%50", "-o", "/dev/null", "--wrap", "sleep 2"],
                           capture_output=True, text=True, check=True).stdout.strip()
    RunDir(run_dir).attempt(1).record_submission("slurm", {str(n): f"{array}_{n}" for n in range(250)}, {})
    wrappers, calls = tmp_path / "bin", tmp_path / "calls.log"
    wrappers.mkdir()
    for tool in ("sacct", "squeue"):
        real = subprocess.run(["which", tool], capture_output=True, text=True, check=True).stdout.strip()
        (wrappers / tool).write_text(f"#!/bin/sh\necho {tool} >> {calls}\nexec {real} \"$@\"\n")
        (wrappers / tool).chmod(0o755)
    try:
        shown = status_json(run_dir, env={"PATH": f"{wrappers}:{os.environ['PATH']}"})
    finally:
        subprocess.run(["scancel", array], check=False)
    assert sorted(calls.read_text().split()) == ["sacct", "squeue"]
    assert len(shown["shards"]) == 250
    assert {s["state"] for s in shown["shards"]} <= {"PENDING", "RUNNING", "COMPLETED", "COMPLETING", "SUBMITTED",
                                                      "ENDING"}, {s["state"] for s in shown["shards"]}
