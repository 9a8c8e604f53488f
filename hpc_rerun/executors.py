"""Where shards run: a Slurm job array through submitit, never a silent fall-back to local."""

from __future__ import annotations

import shutil
from pathlib import Path

import submitit


class SlurmUnavailable(RuntimeError):
    """Slurm was asked for but its client commands are not usable here."""


def check_slurm_clients(commands: tuple[str, ...] = ("sbatch", "srun", "sacct", "squeue")) -> None:
    """Fail with a fix when Slurm's commands are missing (submitit would quietly run locally)."""
    missing = [c for c in commands if shutil.which(c) is None]
    if missing:
        raise SlurmUnavailable(
            f"Slurm was asked for, but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not on PATH. "
            "Load your cluster's Slurm module (e.g. `module load slurm`), start the dev cluster "
            "(`sudo slurm/dev-cluster start`), or use `--executor local`."
        )


def slurm_executor(folder: str | Path, max_requeues: int = 3) -> submitit.AutoExecutor:
    """A submitit executor that is Slurm for certain (``cluster="slurm"`` explicitly). An element signalled
    before its time limit requeues itself up to ``max_requeues`` times (submitit's default 3), then ends."""
    check_slurm_clients()
    return submitit.AutoExecutor(folder=str(folder), cluster="slurm", slurm_max_num_timeout=max_requeues)
