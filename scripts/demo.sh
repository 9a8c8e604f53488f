#!/usr/bin/env bash
# Install hpc-rerun into .venv and run the main job on the embedded defaults.
# Until `hpc-rerun demo` exists (issue: run and demo), that is the overview of the tool.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/hpc-rerun --help
