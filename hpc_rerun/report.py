"""Readable terminal output (rich tables) for the CLI; JSON output lives with each step's data."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
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
