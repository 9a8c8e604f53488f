"""hpc-rerun: find the holes in a large VLM evaluation, rerun them on Slurm, merge the answers back."""

__version__ = "0.1.0"
