"""The package's shape, where it matters to users: login-node steps run without torch and transformers,
an element submitted by an older version still finds its job class, and only backends/ knows executors."""

import json
import re
import subprocess
import sys
from pathlib import Path

from hpc_rerun.benchmark import Config, load_tasks
from hpc_rerun.synthetic import make_item, write_result_file

PACKAGE = Path(__file__).resolve().parent.parent / "hpc_rerun"
FIXTURES = Path(__file__).resolve().parent / "fixtures"

# A login node without the GPU stack: torch, torchvision, transformers and qwen_vl_utils are not installed
# (find_spec answers None, as for a package that is absent), whatever this machine has.
WITHOUT_GPU_STACK = """
import importlib.machinery as machinery, sys
ABSENT = {"torch", "torchvision", "transformers", "qwen_vl_utils"}
class Absent(machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if name.split(".")[0] in ABSENT else super().find_spec(name, path, target)
sys.meta_path = [Absent if f is machinery.PathFinder else f for f in sys.meta_path]
"""


def run_without_gpu_stack(*args: str) -> subprocess.CompletedProcess:
    code = (WITHOUT_GPU_STACK
            + "import sys\nfrom hpc_rerun.cli import main\nsys.argv = ['hpc-rerun', *sys.argv[1:]]\nmain()")
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=300)


def test_login_node_steps_run_without_torch_or_transformers(gappy_benchmark, tiny_model_dir):
    """scan, plan (image tasks included: their visual tokens from pixels.py), status, resubmit, merge-shards,
    report and cancel on a machine where the GPU stack does not exist."""
    bench = gappy_benchmark
    tasks = load_tasks(bench["tasks"])
    write_result_file(bench["results"] / "qwen3vl_image" / "image" / "results.json", "b", Config.parse("x/image"),
                      [make_item(tasks[i], "old answer") for i in sorted(tasks)[:20]])
    check = subprocess.run([sys.executable, "-c", WITHOUT_GPU_STACK + "import torch"], capture_output=True, text=True)
    assert "No module named 'torch'" in check.stderr, "the blocker must make torch absent"

    scan = run_without_gpu_stack("scan", bench["results"], "--data-root", bench["data"], "--tasks", bench["tasks"],
                                 "--json")
    assert scan.returncode == 0, scan.stderr
    plan = run_without_gpu_stack("plan", bench["results"], "--data-root", bench["data"], "--tasks", bench["tasks"],
                                 "--model", tiny_model_dir, "--shards", 2, "--logs", bench["logs"], "--run-id", "r",
                                 "--json")
    assert plan.returncode == 0, plan.stderr
    outline = json.loads(plan.stdout)
    planned = {c for s in outline["shard_table"] for c in s["configs"]}
    assert {"qwen3vl_image/image", "qwen3vl_text/text_json"} <= planned
    run_dir = bench["logs"] / "r"
    status = run_without_gpu_stack("status", run_dir, "--json")
    assert status.returncode == 1 and {s["state"] for s in json.loads(status.stdout)["shards"]} == {"PLANNED"}
    for command in (("resubmit", run_dir, "--no-submit"), ("merge-shards", run_dir, "--dry-run"),
                    ("report", bench["results"], "--dry-run"), ("cancel", run_dir)):
        proc = run_without_gpu_stack(*command)
        assert proc.returncode == 0, f"{command}: {proc.stdout}\n{proc.stderr}"


def test_an_element_submitted_before_the_move_finds_its_job_class():
    """A submitit pickle written by the version before inference/ existed (tests/fixtures, made with that
    version's ``hpc_rerun.worker.ShardJob``) loads as today's job class, which requeues itself the same way."""
    from submitit.core.utils import DelayedSubmission

    from hpc_rerun.inference.job import ShardJob

    fixture = FIXTURES / "submitted-before-move.pkl"
    assert b"hpc_rerun.worker" in fixture.read_bytes()
    submission = DelayedSubmission.load(fixture)
    assert type(submission.function) is ShardJob
    requeued = submission.function.checkpoint(*submission.args)
    assert type(requeued.function) is ShardJob and requeued.args == submission.args


def test_only_backends_branch_on_the_executor():
    offenders = [f"{path.relative_to(PACKAGE)}:{n}" for path in PACKAGE.rglob("*.py") if "backends" not in path.parts
                 for n, line in enumerate(path.read_text().splitlines(), 1)
                 if re.search(r"""executor\S*\s*==|==\s*["'](slurm|local)["']""", line)]
    assert offenders == []


def test_scoring_imports_without_torch_or_transformers():
    """merge and rescore score on a login node: every module of hpc_rerun.scoring imports where the GPU stack
    does not exist, and none of them pulls it in."""
    modules = sorted(p.stem for p in (PACKAGE / "scoring").glob("*.py") if p.stem != "__init__")
    assert {"metrics", "charts", "sandbox"} <= set(modules)
    code = WITHOUT_GPU_STACK + (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    if not name.startswith('_'):\n"
        "        importlib.import_module('hpc_rerun.scoring.' + name)\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ABSENT)\n"
        "assert not heavy, heavy\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
