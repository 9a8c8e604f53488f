"""The installed console script: help that explains the flow, a version, the tiny-model builder."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(sys.executable).parent / "hpc-rerun"


def test_help_explains_the_flow_and_exit_codes():
    out = subprocess.run([SCRIPT, "--help"], capture_output=True, text=True, check=True).stdout
    assert "scan (what is missing, and why) -> plan" in out
    assert "3 an input could not be read" in out
    assert "scan" in out.split("Commands:")[1]


def test_version():
    out = subprocess.run([SCRIPT, "--version"], capture_output=True, text=True, check=True).stdout
    # The installed distribution's own metadata, not the constant the command prints.
    assert out.strip() == f"hpc-rerun, version {importlib.metadata.version('hpc-rerun')}"
    assert re.fullmatch(r"hpc-rerun, version \d+\.\d+\.\d+", out.strip())


def test_build_tiny_model_command(tmp_path):
    proc = subprocess.run([SCRIPT, "build-tiny-model", tmp_path / "m"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "m" / "model.safetensors").exists()
    assert "tiny Qwen3-VL written to" in proc.stdout
