"""Shared fixtures: the real dev Slurm cluster and a tiny Qwen3-VL built on the spot."""

from __future__ import annotations

import atexit
import importlib.resources
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from PIL import Image

from hpc_rerun.benchmark import Config, load_tasks
from hpc_rerun.synthetic import make_item, write_result_file

REPO = Path(__file__).resolve().parent.parent
DEV_CLUSTER = REPO / "slurm" / "dev-cluster"
MINI = Path(__file__).parent / "fixtures" / "realhitbench-mini"
DEMO_DATA = importlib.resources.files("hpc_rerun") / "demo_data"  # three of the mini tables, shipped for the demo


def mini_data_root(target: Path) -> Path:
    """The mini benchmark's tables in one data root: the fixture's own and the three the package ships for the
    demo (one copy of each, read through importlib.resources)."""
    for source in (MINI / "data", DEMO_DATA):
        for folder in source.iterdir():
            if not folder.is_dir():
                continue
            (target / folder.name).mkdir(parents=True, exist_ok=True)
            for file in folder.iterdir():
                with importlib.resources.as_file(file) as path:
                    shutil.copyfile(path, target / folder.name / file.name)
    return target


_MINI_DATA_TMP = tempfile.mkdtemp(prefix="hpc-rerun-mini-data-")
atexit.register(shutil.rmtree, _MINI_DATA_TMP, ignore_errors=True)
MINI_DATA = mini_data_root(Path(_MINI_DATA_TMP))  # read-only use: tests that write copy it first


@pytest.fixture(scope="session")
def slurm_cluster() -> str:
    """Start (or reuse) the real one-node dev cluster; returns the SLURM_CONF path.

    Starting is idempotent and takes about 4 s the first time, well under 1 s when already running.
    Tests that need it fail, not skip, when it cannot start: CI must run them.
    """
    proc = subprocess.run([str(DEV_CLUSTER), "start"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"dev cluster did not start:\n{proc.stdout}\n{proc.stderr}"
    env_line = subprocess.run([str(DEV_CLUSTER), "env"], capture_output=True, text=True, check=True).stdout
    conf = env_line.strip().split("=", 1)[1]
    os.environ["SLURM_CONF"] = conf
    return conf


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen3-VL on disk, built once per test session."""
    from hpc_rerun.inference.tinymodel import build_tiny_qwen3vl

    return build_tiny_qwen3vl(tmp_path_factory.mktemp("tiny-qwen3vl"))


@pytest.fixture
def no_slurm_path(tmp_path, monkeypatch):
    """A PATH with python but without any Slurm client, as on a laptop."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("python3", "bash", "env"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    monkeypatch.setenv("PATH", str(bin_dir))
    return bin_dir


@pytest.fixture
def gappy_benchmark(tmp_path):
    """The mini benchmark with rendered images and a text_json result file missing 10 runnable tasks."""
    data = tmp_path / "data"
    data.mkdir()
    for folder in MINI_DATA.iterdir():
        (data / folder.name).symlink_to(folder)
    (data / "image").mkdir()
    tasks = load_tasks(MINI / "QA_mini.json")
    for name in {t.file_name for t in tasks.values()}:
        Image.new("RGB", (320, 240), "white").save(data / "image" / f"{name}.png")
    ids = sorted(tasks)
    results = tmp_path / "results"
    present = ids[:27]
    write_result_file(results / "qwen3vl_text" / "text_json" / "results.json", "b", Config.parse("x/text_json"),
                      [make_item(tasks[i], "old answer") for i in present])
    return {"results": results, "data": data, "tasks": MINI / "QA_mini.json", "logs": tmp_path / "logs",
            "runnable": [i for i in ids[27:] if i not in (2960, 2961, 2962)]}  # society-table10_swap.json is missing


def max_overlap(intervals) -> int:
    """The most intervals (start, end) open at one instant: how many jobs ran at once."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    now = peak = 0
    for _, step in events:
        now += step
        peak = max(peak, now)
    return peak
