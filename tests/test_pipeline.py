"""`run` and `demo`: the whole job in one command, on this machine and on the real dev cluster."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hpc_rerun.demo import write_demo
from hpc_rerun.results import load_result_file

HPC_RERUN = [sys.executable, "-m", "hpc_rerun.cli"]


def cli(*args, timeout=300, cwd=None):
    return subprocess.run([*HPC_RERUN, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=cwd)


def assert_complete(results: Path, answered: set[tuple[str, int]]):
    """Every rerun task is in its file once, as the tiny model's answer, with provenance."""
    for config, task_id in answered:
        path = next((results / config).glob("results*.json"))
        items = [i for i in load_result_file(path).items if i["id"] == task_id]
        assert len(items) == 1, (config, task_id)
        assert items[0]["Prediction"] == "Yes" and items[0]["provenance"]["config"] == config


@pytest.mark.timeout(300)
def test_demo_fills_every_runnable_gap_on_this_machine(tmp_path):
    proc = cli("demo", tmp_path / "demo", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "before:" in proc.stdout and "after:" in proc.stdout
    assert "runnable gaps left: 0" in proc.stdout
    skip = json.loads((tmp_path / "demo/results/qwen3vl_text/text_csv/skip_ids.json").read_text())
    assert skip["error_ids"] == [] and skip["categorized"]["incomplete_runs"] == []
    assert skip["categorized"]["file_dependency_issues"] == [2960, 2961, 2962], "missing files stay reported"
    assert_complete(tmp_path / "demo" / "results", {("qwen3vl_text/text_csv", 1957), ("qwen3vl_text/text_csv", 1636),
                                                    ("qwen3vl_resize_pic/image", 1634),
                                                    ("qwen3vl_default_pic/mix_markdown", 1638)})


@pytest.fixture
def demo_tree(tmp_path):
    return write_demo(tmp_path / "bench")


def run_args(paths, *extra):
    return ["run", paths["results"], "--data-root", paths["data"], "--tasks", paths["tasks"], "--model", paths["model"],
            "--greedy", "--max-new-tokens", 16, "--logs", paths["root"] / "logs", *extra]


@pytest.mark.timeout(300)
def test_run_without_slurm_says_it_runs_locally(demo_tree, no_slurm_path):
    proc = cli(*run_args(demo_tree, "--parallel", 2))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "executor: local (no srun on PATH" in proc.stdout
    assert "after the rerun:" in proc.stdout


@pytest.mark.slurm
@pytest.mark.timeout(420)
def test_run_on_the_dev_cluster_completes_with_no_runnable_gap(slurm_cluster, demo_tree):
    profile = Path(__file__).parent.parent / "slurm" / "profiles" / "dev-cluster.toml"
    proc = cli(*run_args(demo_tree, "--executor", "slurm", "--profile", profile, "--shards", 3), timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (run_dir,) = (demo_tree["root"] / "logs").iterdir()
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["attempts"][0]["executor"] == "slurm" and len(plan["attempts"][0]["jobs"]) == 3
    status = json.loads(cli("status", run_dir, "--json").stdout)
    assert status["summary"]["finished"] and status["summary"]["done"] == status["summary"]["total"] == 9
    assert_complete(demo_tree["results"], {("qwen3vl_text/text_csv", 2907), ("qwen3vl_resize_pic/image", 2906),
                                           ("qwen3vl_default_pic/mix_markdown", 1959)})
