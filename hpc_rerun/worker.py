"""Old path of the array elements' job class: an element submitted before ``inference/`` existed is
unpickled from ``hpc_rerun.worker.ShardJob`` when Slurm requeues it."""

from .inference.job import ShardJob

__all__ = ["ShardJob"]
