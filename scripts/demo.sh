#!/usr/bin/env bash
# Install hpc-rerun into .venv and run the main job on the embedded defaults: `hpc-rerun demo`
# (the bundled mini benchmark with holes, a tiny model, the local executor; about a minute).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/hpc-rerun demo "${1:-hpc-rerun-demo}"
