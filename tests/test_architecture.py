"""The package's shape, where it matters to users: login-node steps run without torch and transformers,
an element submitted by an older version still finds its job class, and only backends/ knows executors."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

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
    code = WITHOUT_GPU_STACK + "import sys\nfrom hpc_rerun.cli import main\nsys.argv = ['hpc-rerun', *sys.argv[1:]]\nmain()"
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
    assert {"qwen3vl_image/image", "qwen3vl_text/text_json"} <= {c for s in outline["shard_table"] for c in s["configs"]}
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


@pytest.mark.parametrize("limits", [(None, None), (256 * 32 * 32, 1280 * 32 * 32), (4 * 32 * 32, 16 * 32 * 32)])
def test_planner_image_tokens_match_qwen_vl_utils(limits):
    """pixels.py (torch-free, for the planner) sizes every image as qwen_vl_utils does for the worker."""
    from qwen_vl_utils.vision_process import smart_resize

    from hpc_rerun.pixels import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, TOKEN_PIXELS, resized, visual_tokens

    min_pixels, max_pixels = limits
    low, high = min(min_pixels or DEFAULT_MIN_PIXELS, max_pixels or DEFAULT_MAX_PIXELS), max_pixels or DEFAULT_MAX_PIXELS
    sizes = [(h, w) for h in (1, 31, 33, 240, 1000, 4093, 7000, 12000) for w in (1, 17, 320, 999, 3000, 7001)
             if max(h, w) / min(h, w) <= 200]
    for h, w in sizes:
        expected = smart_resize(h, w, factor=TOKEN_PIXELS, min_pixels=low, max_pixels=high)
        assert resized(h, w, low, high) == expected, (h, w)
        assert visual_tokens(w, h, min_pixels, max_pixels) == (expected[0] // 32) * (expected[1] // 32)


def test_only_backends_branch_on_the_executor():
    offenders = [f"{path.relative_to(PACKAGE)}:{n}" for path in PACKAGE.rglob("*.py") if "backends" not in path.parts
                 for n, line in enumerate(path.read_text().splitlines(), 1)
                 if re.search(r"""executor\S*\s*==|==\s*["'](slurm|local)["']""", line)]
    assert offenders == []
