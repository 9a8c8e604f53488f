"""Shared fixtures: the real dev Slurm cluster and a tiny Qwen3-VL built on the spot."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEV_CLUSTER = REPO / "slurm" / "dev-cluster"


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
    from hpc_rerun.tinymodel import build_tiny_qwen3vl

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


def max_overlap(intervals) -> int:
    """The most intervals (start, end) open at one instant: how many jobs ran at once."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    now = peak = 0
    for _, step in events:
        now += step
        peak = max(peak, now)
    return peak
