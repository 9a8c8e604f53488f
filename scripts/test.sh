#!/usr/bin/env bash
# Install what the tests need (the package, pytest, ruff, import-linter, the real dev Slurm cluster), start
# the cluster, check style and the import layers, and run the whole suite. Root on Debian/Ubuntu.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
slurm/dev-cluster start
eval "$(slurm/dev-cluster env)"
# Style and the import layers first: seconds, and they name the file and line.
.venv/bin/ruff check .
.venv/bin/lint-imports
exec .venv/bin/python -m pytest "$@"
