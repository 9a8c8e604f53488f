"""run: scan -> plan -> submit -> live progress -> resubmit what failed -> merge -> scan, in one command.

Ctrl-C leaves the jobs running: everything is in the run directory, so `status`, `resubmit` and
`merge-shards` pick it up from there.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from rich.console import Console
from rich.live import Live

from .plan import RunnableCosts, RunSettings, pack_shards, shard_count, write_run
from .scan import ScanReport


def choose_executor(requested: str, console: Console) -> str:
    """``auto``: Slurm where ``srun`` is on PATH, else this machine; says which it chose."""
    if requested != "auto":
        return requested
    chosen = "slurm" if shutil.which("srun") else "local"
    reason = "srun is on PATH" if chosen == "slurm" else "no srun on PATH"
    console.print(f"executor: {chosen} ({reason}; choose with --executor slurm|local)", highlight=False)
    return chosen


def submit_attempt(run_dir: Path, attempt: int, executor: str, options: dict, parallel: int) -> None:
    from .submit import submit_local, submit_slurm

    if executor == "local":
        submit_local(run_dir, attempt, parallel)
    else:
        submit_slurm(run_dir, attempt, options)


def watch(run_dir: Path, executor: str, parallel: int, max_attempts: int, console: Console, poll_s: float) -> int:
    """Refresh the status until every shard has ended; resubmit what is missing up to ``max_attempts``."""
    from .report import status_view
    from .resubmit import resubmit
    from .status import gather, summary

    attempts = 1
    with Live(console=console, refresh_per_second=2, transient=False) as live:
        while True:
            statuses = gather(run_dir)
            totals = summary(run_dir, statuses)
            live.update(status_view(run_dir, statuses, totals))
            if totals["finished"]:
                if not totals["needs_rerun"] or attempts >= max_attempts:
                    return attempts
                attempt, entries, options = resubmit(run_dir)
                if attempt is None:
                    return attempts
                submit_attempt(run_dir, attempt, executor, options, parallel)
                attempts += 1
            time.sleep(poll_s)


def run_pipeline(report: ScanReport, variants, settings: RunSettings, *, logs: Path, executor: str,
                 slurm_options: dict, shards: int | None, target_hours: float | None, max_attempts: int,
                 parallel: int, console: Console, poll_s: float = 2.0) -> Path | None:
    """Plan, submit, watch, resubmit and merge; returns the run directory (None: nothing to rerun)."""
    from .merge import merge_run

    costs = RunnableCosts(report, variants, settings.model, settings.generation).costs()
    if not costs:
        console.print("nothing to rerun: no configuration has runnable gaps")
        return None
    packed = pack_shards(costs, shard_count(sum(c.seconds for c in costs), len(costs), shards, target_hours))
    run_dir = write_run(logs, report, packed, settings, variants, slurm_options)
    console.print(f"run directory: {run_dir} ({len(costs)} tasks in {len(packed)} shards)", highlight=False)
    submit_attempt(run_dir, 1, executor, slurm_options, parallel)
    try:
        watch(run_dir, executor, parallel, max_attempts, console, poll_s)
    except KeyboardInterrupt:
        console.print(f"\nstopped watching; the jobs keep running. Reattach with:\n"
                      f"  hpc-rerun status {run_dir} --watch\n  hpc-rerun merge-shards {run_dir}", highlight=False)
        raise
    console.print()
    reports, problems, plan = merge_run(run_dir, None)
    from .report import print_merge
    from .scan import rescan_after_merge

    print_merge(reports, dry_run=False, console=console)
    rescan_after_merge(reports, plan, Path(plan["data_root"]), Path(plan["task_list"]))
    for problem in problems:
        console.print(f"[red]error:[/red] {problem}", highlight=False)
    return run_dir
