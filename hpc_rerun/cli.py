"""The `hpc-rerun` command line: one subcommand per step of the flow."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from . import __version__

HELP = """Finish a large VLM evaluation on a Slurm cluster.

\b
The flow:
  scan          find every missing or failed task per configuration
  plan          turn the runnable gaps into cost-balanced shards (a run directory under logs/)
  submit        one Slurm job array (or local processes) that reruns the shards
  status        progress, rate, ETA and failures of a run
  resubmit      rerun only what is still missing, with escalation
  merge-shards  merge the answers back into the result files, atomically
  run           all of the above in one command

Exit codes: 0 success, 1 a check failed (e.g. gaps with --fail-on-gaps), 2 bad usage or unreadable input.
"""


@click.group(help=HELP, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="hpc-rerun")
def main() -> None:
    pass


@main.command("build-tiny-model")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", default=0, show_default=True, help="Seed for the random weights.")
def build_tiny_model(out_dir: Path, seed: int) -> None:
    """Write a tiny random Qwen3-VL (real architecture and processor, ~1 MB) to OUT_DIR.

    It loads with Qwen3VLForConditionalGeneration.from_pretrained and AutoProcessor.from_pretrained,
    exactly like Qwen3-VL-8B-Instruct, and needs no model hub. Tests and the demo use it.
    """
    from .tinymodel import build_tiny_qwen3vl

    path = build_tiny_qwen3vl(out_dir, seed=seed)
    click.echo(f"tiny Qwen3-VL written to {path}")


if __name__ == "__main__":
    sys.exit(main())
