"""What submitit pickles for each array element: a small callable that runs one shard.

It imports the worker (torch, transformers) only when it runs, so a login node submits without them.
submitit pickles it by module path: ``hpc_rerun.worker.ShardJob`` (its path before this package existed)
stays importable for elements submitted by an older version and requeued after an upgrade.

While a shard runs, submitit's preemption signal waits for the worker's safe points (signals.py).
"""

from __future__ import annotations

import submitit

from .signals import signals_at_safe_points


class ShardJob(submitit.helpers.Checkpointable):
    """On timeout or preemption submitit requeues it (``checkpoint``: the same spec again), and the worker
    resumes past what the shard file already holds."""

    def __call__(self, spec_path: str) -> dict:
        from .worker import run_shard

        with signals_at_safe_points():
            return run_shard(spec_path)
