#!/usr/bin/env bash
# Install what the tests need (the package, pytest, the real dev Slurm cluster), start the cluster,
# and run the whole suite. Root on Debian/Ubuntu. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
slurm/dev-cluster start
eval "$(slurm/dev-cluster env)"
exec .venv/bin/python -m pytest "$@"
