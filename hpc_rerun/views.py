"""Readable terminal output (rich tables) for the CLI; JSON output lives with each step's data."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console, Group
from rich.progress_bar import ProgressBar
from rich.table import Table

from .merge import ConfigMerge
from .scan import ScanReport


def _ids(ids: list[int], limit: int = 8) -> str:
    shown = ", ".join(str(i) for i in ids[:limit])
    return shown + (f", ... (+{len(ids) - limit})" if len(ids) > limit else "")


def print_scan(report: ScanReport, written: list[Path] = (), console: Console | None = None) -> None:
    console = console or Console()
    if not console.is_terminal:  # pipes and logs get whole lines, not an 80-column cut
        console.width = 160
    table = Table(title=f"scan of {report.results_root} ({len(report.configs)} configurations)")
    for column, justify in [("configuration", "left"), ("done", "right"), ("ok", "right"),
                            ("errors", "left"), ("absent", "right"), ("unrunnable", "right"), ("runnable", "right")]:
        table.add_column(column, justify=justify)
    totals = [0, 0, 0, 0, 0, 0]
    for scan in report.configs:
        classes = ", ".join(f"{cls} {len(ids)}" for cls, ids in scan.errors_by_class().items()) or "-"
        row = [scan.completed, len(scan.success), len(scan.errors), len(scan.absent), len(scan.unrunnable),
               len(scan.runnable)]
        totals = [t + r for t, r in zip(totals, row)]
        table.add_row(scan.config.name, f"{row[0]}/{scan.total_tasks}", str(row[1]), classes, str(row[3]),
                      str(row[4]), f"[bold]{row[5]}[/bold]" if row[5] else "0")
    if len(report.configs) > 1:
        table.add_section()
        table.add_row("total", str(totals[0]), str(totals[1]), str(totals[2]), str(totals[3]), str(totals[4]),
                      f"[bold]{totals[5]}[/bold]")
    console.print(table)
    for scan in report.configs:
        notes = []
        if scan.runnable:
            notes.append(f"runnable: {_ids(scan.runnable)}")
        missing_files = sorted({f for files in scan.unrunnable.values() for f in files})
        if missing_files:
            notes.append(f"missing source files: {', '.join(missing_files[:4])}"
                         + (f" (+{len(missing_files) - 4})" if len(missing_files) > 4 else ""))
        if scan.duplicates:
            notes.append(f"duplicate ids: {_ids(scan.duplicates)}")
        if scan.unknown_ids:
            notes.append(f"ids not in the task list: {_ids(scan.unknown_ids)}")
        for note in notes:
            console.print(f"  {scan.config.name}: {note}", highlight=False)
    for path in written:
        console.print(f"wrote {path}", highlight=False)


def print_merge(reports: list[ConfigMerge], dry_run: bool, console: Console | None = None) -> None:
    console = console or Console()
    if not console.is_terminal:
        console.width = 160
    title = "merge (dry run: nothing written)" if dry_run else "merge"
    table = Table(title=title)
    for column in ("configuration", "errors replaced", "absent inserted", "successes kept", "overwritten",
                   "still errors", "file"):
        table.add_column(column, justify="left" if column in ("configuration", "file") else "right")
    for r in reports:
        written = f"written (backup {r.backup.name})" if r.backup else "written"
        status = r.problem and "[red]not merged[/red]" or (
            ("would change" if dry_run else written) if r.changed else "unchanged")
        table.add_row(r.config, str(len(r.replaced)), str(len(r.inserted)), str(len(r.kept_success)),
                      str(len(r.overwritten)), str(len(r.still_errors)), status)
    console.print(table)


def print_plan(outline: dict, dry_run: bool, console: Console | None = None) -> None:
    console = console or Console()
    if not console.is_terminal:
        console.width = 160
    title = (f"plan: {outline['tasks']} tasks in {outline['shards']} shards, ~{outline['estimated_gpu_hours']} GPU h, "
             f"~{outline['estimated_wall_hours']} h wall with a GPU per shard (this engine's H200 rates)")
    table = Table(title=title + (" (dry run: nothing written)" if dry_run else ""))
    for column in ("shard", "tasks", "est. seconds", "configurations"):
        table.add_column(column, justify="left" if column == "configurations" else "right")
    for row in outline["shard_table"]:
        table.add_row(str(row["shard"]), str(row["tasks"]), f"{row['cost_s']:.0f}", ", ".join(row["configs"]))
    console.print(table)
    console.print(f"balance (largest / mean shard): {outline['balance_max_over_mean']}", highlight=False)
    console.print("sbatch options:\n  " + "\n  ".join(outline["sbatch"]), highlight=False)
    if outline["run_dir"]:
        console.print(f"run directory: {outline['run_dir']}\nnext: hpc-rerun submit {outline['run_dir']}",
                      highlight=False)


def _duration(seconds) -> str:
    if seconds is None:
        return "-"
    minutes, sec = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{sec:02d}s"


def status_view(run_dir, statuses, totals: dict):
    """The status table, a progress line and what to do next, as one renderable (for rich Live too)."""
    table = Table(title=f"status of {run_dir}")
    for column in ("attempt", "shard", "job", "state", "done", "errors", "predicted", "actual"):
        table.add_column(column, justify="left" if column in ("job", "state") else "right")
    colours = {"COMPLETED": "green", "RUNNING": "cyan", "PENDING": "yellow"}
    for s in statuses:
        colour = colours.get(s.state, "red")
        state = f"[{colour}]{s.state}[/{colour}]" + (f" ({s.note})" if s.note else "")
        table.add_row(str(s.attempt), str(s.shard), s.job_id or "-", state,
                      f"{s.done}/{s.total}", str(s.errors), _duration(s.predicted_s), _duration(s.actual_s))
    rate = totals["rate_tasks_per_s"]
    line = Table.grid(padding=(0, 2))
    line.add_row(ProgressBar(total=max(totals["total"], 1), completed=totals["done"], width=40),
                 f"{totals['done']}/{totals['total']} tasks done ({totals['errors']} as errors)"
                 + (f", {rate * 3600:.0f} tasks/h, ETA {_duration(totals['eta_s'])}" if rate else ""))
    parts = [table, line]
    if totals["needs_rerun"]:
        parts.append(f"{totals['needs_rerun']} shard(s) ended with tasks missing: hpc-rerun resubmit {run_dir}")
    elif totals["finished"]:
        parts.append(f"finished: hpc-rerun merge-shards {run_dir}")
    return Group(*parts)


def print_status(run_dir, statuses, totals: dict, console: Console | None = None) -> None:
    console = console or Console()
    if not console.is_terminal:
        console.width = 160
    console.print(status_view(run_dir, statuses, totals), highlight=False)


def rescore_lines(reports, write: bool) -> list[str]:
    """Per configuration what rescore found (items that differ, by metric, examples), then the total."""
    lines = []
    for r in reports:
        metrics = ", ".join(f"{name} {count}" for name, count in sorted(r.changed.items())) or "-"
        layers = ", ".join(f"{layer} {count}" for layer, count in sorted(r.sandbox_layers.items()))
        lines.append(f"{r.config}: {r.items} answered, {r.changed_items} differ ({metrics})"
                     f"{', written' if r.written else ''}{f'; chart code sandboxed: {layers}' if layers else ''}")
        lines += [f"  id {e['id']}: stored {e['stored']} -> {e['rescored']}" for e in r.examples]
    total = sum(r.changed_items for r in reports)
    lines.append(f"{total} item(s) whose stored Metrics differ{'' if write or not total else ' (--write to fix)'}")
    return lines


def report_lines(written: dict[str, list[str]], checked: int, dry_run: bool) -> list[str]:
    """The derived files report wrote (or would write), then the count."""
    changed = [p for paths in written.values() for p in paths]
    return [f"{'would write' if dry_run else 'wrote'} {path}" for path in changed] + [
        f"{len(changed)} file(s) {'to write' if dry_run else 'written'}; "
        f"{checked} configuration(s) with aggregate_metrics checked"]
