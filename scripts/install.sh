#!/usr/bin/env bash
# Create .venv and install hpc-rerun into it (with the test extras when given "test").
# torch/torchvision are pinned to the CUDA builds this project is tested with.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -m venv --help >/dev/null 2>&1; then
  [ "$(id -u)" -eq 0 ] || { echo "install: python3 venv support is missing; run: sudo apt-get install -y python3-venv" >&2; exit 1; }
  apt-get update -q && apt-get install -y -q python3-venv python3-pip
fi
# bubblewrap: the kernel-isolated sandbox for the model's plotting code (hpc_rerun/scoring/sandbox.py);
# without it scoring falls back to a weaker layer and says so.
if ! command -v bwrap >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -q && apt-get install -y -q bubblewrap
  else
    echo "install: bubblewrap is missing (the sandbox falls back to a weaker layer); run: sudo apt-get install -y bubblewrap" >&2
  fi
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
extras=""
[ "${1:-}" = test ] && extras="[test]"
.venv/bin/pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1 2>&1 | { grep -v "^WARNING: Location" || true; }
.venv/bin/pip install -q --disable-pip-version-check -e ".$extras" 2>&1 | { grep -v "^WARNING: Location" || true; }
