"""run: scan -> plan -> submit -> live progress -> resubmit what failed -> merge -> scan, in one command.

Ctrl-C leaves the jobs running: everything is in the run directory, so `status`, `resubmit` and
`merge-shards` pick it up from there.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.live import Live

from .backends import SubmitOptions, submit_attempt
from .merge import merge_run
from .plan import RunSettings, plan_shards, write_run
from .resubmit import resubmit
from .rundir import RunDir
from .scan import ScanReport, rescan_after_merge
from .status import status_round
from .views import print_merge, status_view


def watch(run: RunDir, parallel: int, max_attempts: int, console: Console, poll_s: float) -> int:
    """Refresh the status until every shard has ended; resubmit what is missing up to ``max_attempts``."""
    attempts = 1
    with Live(console=console, refresh_per_second=2, transient=False) as live:
        while True:
            status = status_round(run)
            totals = status.totals
            live.update(status_view(run.path, status.shards, totals))
            if totals["finished"]:
                if not totals["needs_rerun"] or attempts >= max_attempts:
                    return attempts
                attempt, _, _ = resubmit(run, parallel)
                if attempt is None:
                    return attempts
                attempts += 1
            time.sleep(poll_s)


def run_pipeline(report: ScanReport, variants, settings: RunSettings, *, logs: Path, executor: str,
                 options: SubmitOptions, shards: int | None, target_hours: float | None, max_attempts: int,
                 console: Console, poll_s: float = 2.0) -> Path | None:
    """Plan, submit, watch, resubmit and merge; returns the run directory (None: nothing to rerun)."""
    planned = plan_shards(report, variants, settings, shards, target_hours)
    if planned is None:
        console.print("nothing to rerun: no configuration has runnable gaps")
        return None
    slurm = options.slurm.to_dict() if options.slurm else {}
    run = write_run(logs, report, planned.shards, settings, variants, slurm)
    run_dir = run.path
    console.print(f"run directory: {run_dir} ({len(planned.costs)} tasks in {len(planned.shards)} shards)",
                  highlight=False)
    submit_attempt(run.attempt(1), executor, options)
    try:
        watch(run, options.parallel, max_attempts, console, poll_s)
    except KeyboardInterrupt:
        console.print(f"\nstopped watching; the jobs keep running. Reattach with:\n"
                      f"  hpc-rerun status {run_dir} --watch\n  hpc-rerun merge-shards {run_dir}", highlight=False)
        raise
    console.print()
    reports, problems, plan = merge_run(run, None)
    print_merge(reports, dry_run=False, console=console)
    rescan_after_merge(reports, plan, Path(plan.data_root), Path(plan.task_list))
    for problem in problems:
        console.print(f"[red]error:[/red] {problem}", highlight=False)
    return run_dir
