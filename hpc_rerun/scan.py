"""Scan: per configuration, which task ids are done, failed (by class), absent, or can never run.

Results on disk are the truth: everything here is recomputed from the result files, the task list
and the data root on every call, so a scan can be rerun at any time.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import atomic_write_json
from .benchmark import Config, Task, classify_error, load_tasks, required_files
from .results import ResultFile, ResultFileError, best_items, item_ok, load_result_file
from .rundir import Plan

INCOMPLETE_REASON = "Incomplete run or processing error (files exist but task not processed)"


class SourceIndex:
    """Answers "does this data file exist?" with one directory listing per folder."""

    def __init__(self, data_root: str | Path):
        self.root = Path(data_root)
        self._listings: dict[str, frozenset[str]] = {}

    def exists(self, relpath: str) -> bool:
        folder, _, name = relpath.rpartition("/")
        listing = self._listings.get(folder)
        if listing is None:
            try:
                listing = frozenset(os.listdir(self.root / folder))
            except (FileNotFoundError, NotADirectoryError):
                listing = frozenset()
            self._listings[folder] = listing
        return name in listing

    def missing(self, relpaths: list[str]) -> list[str]:
        return [p for p in relpaths if not self.exists(p)]


def missing_inputs(index: SourceIndex, task: Task, config: Config) -> list[str]:
    """The data files a task needs that are not there: the one rule for what can run, for the scan and the
    worker alike (any table text can be read, as the users read it: tables.read_table)."""
    return index.missing(required_files(task, config))


@dataclass
class ConfigScan:
    config: Config
    result_file: Path | None
    layout: str | None
    sources: list[Path]
    total_tasks: int
    success: list[int] = field(default_factory=list)
    errors: dict[int, str] = field(default_factory=dict)  # id -> error class
    absent: list[int] = field(default_factory=list)
    unrunnable: dict[int, list[str]] = field(default_factory=dict)  # id -> missing source files
    duplicates: list[int] = field(default_factory=list)
    unknown_ids: list[int] = field(default_factory=list)

    @property
    def completed(self) -> int:
        return len(self.success) + len(self.errors)

    @property
    def runnable(self) -> list[int]:
        """Absent or failed ids whose source files all exist: what a rerun can fix."""
        return sorted(i for i in [*self.absent, *self.errors] if i not in self.unrunnable)

    def errors_by_class(self) -> dict[str, list[int]]:
        grouped: dict[str, list[int]] = {}
        for task_id in sorted(self.errors):
            grouped.setdefault(self.errors[task_id], []).append(task_id)
        return grouped

    def to_json(self) -> dict:
        return {
            "config": self.config.name,
            "variant": self.config.variant,
            "modality": self.config.modality,
            "format": self.config.format,
            "result_file": str(self.result_file) if self.result_file else None,
            "layout": self.layout,
            "sources": [str(s) for s in self.sources],
            "total_tasks": self.total_tasks,
            "completed": self.completed,
            "success": len(self.success),
            "errors": self.errors_by_class(),
            "absent": self.absent,
            "unrunnable": {str(k): v for k, v in sorted(self.unrunnable.items())},
            "duplicates": self.duplicates,
            "unknown_ids": self.unknown_ids,
            "runnable": self.runnable,
        }


@dataclass
class ScanReport:
    results_root: Path
    task_list: Path
    data_root: Path
    configs: list[ConfigScan]
    problems: list[str]

    def to_json(self) -> dict:
        return {
            "results_root": str(self.results_root),
            "task_list": str(self.task_list),
            "data_root": str(self.data_root),
            "configs": [c.to_json() for c in self.configs],
            "problems": self.problems,
            "totals": {
                "configs": len(self.configs),
                "errors": sum(len(c.errors) for c in self.configs),
                "absent": sum(len(c.absent) for c in self.configs),
                "unrunnable": sum(len(c.unrunnable) for c in self.configs),
                "runnable": sum(len(c.runnable) for c in self.configs),
            },
        }


def scan_config(
    config: Config,
    sources: list[ResultFile],
    tasks: dict[int, Task],
    index: SourceIndex,
) -> ConfigScan:
    """Classify every task id of one configuration from its result sources (compiled file first)."""
    compiled = sources[0] if sources and sources[0].layout != "checkpoint" else None
    best, duplicates = best_items([s.items for s in sources])
    scan = ConfigScan(
        config=config,
        result_file=compiled.path if compiled else None,
        layout=compiled.layout if compiled else None,
        sources=[s.path for s in sources],
        total_tasks=len(tasks),
        duplicates=duplicates,
        unknown_ids=sorted(i for i in best if i not in tasks),
    )
    for task_id, task in tasks.items():
        item = best.get(task_id)
        if item is not None and item_ok(item):
            scan.success.append(task_id)
            continue
        if item is None:
            scan.absent.append(task_id)
        else:
            scan.errors[task_id] = classify_error(item["Prediction"], config.modality)
        missing = missing_inputs(index, task, config)
        if missing:
            scan.unrunnable[task_id] = missing
    scan.success.sort()
    scan.absent.sort()
    return scan


def discover_configs(results_root: Path) -> tuple[dict[Config, Path], list[str]]:
    """Find ``<variant>/<modality>[_<format>]/results*.json`` under the compiled tree."""
    found: dict[Config, Path] = {}
    problems: list[str] = []
    if not results_root.is_dir():
        return found, [f"{results_root}: results root is not a directory"]
    for variant_dir in sorted(p for p in results_root.iterdir() if p.is_dir()):
        for leaf in sorted(p for p in variant_dir.iterdir() if p.is_dir()):
            config = Config.from_parts(variant_dir.name, leaf.name)
            if config is None:
                continue
            candidates = sorted(leaf.glob("results*.json"))
            if (leaf / "results.json") in candidates:
                found[config] = leaf / "results.json"
            elif len(candidates) == 1:
                found[config] = candidates[0]
            elif not candidates:
                problems.append(f"{leaf}: configuration folder without a results*.json file")
            else:
                names = ", ".join(c.name for c in candidates)
                problems.append(f"{leaf}: several result files ({names}); keep one, or rename the one to use to "
                                "results.json")
    return found, problems


def load_run_dir(run_dir: Path) -> list[ResultFile]:
    """A run directory's result files, oldest first, then its checkpoint (the newest state)."""
    files = sorted(run_dir.glob("results_*.json"))
    if (run_dir / "checkpoint.json").exists():
        files.append(run_dir / "checkpoint.json")
    if not files:
        raise ResultFileError(f"{run_dir}: no results_*.json or checkpoint.json in this run directory")
    return [load_result_file(f) for f in files]


def load_run_dir_for(run_dir: Path, config_name: str | None, known: list[Config]) -> tuple[Config, list[ResultFile]]:
    """A run directory's files and the configuration they belong to (given, or read from its files)."""
    files = load_run_dir(run_dir)
    return (Config.parse(config_name) if config_name else run_dir_config(run_dir, files, known)), files


def run_dir_config(run_dir: Path, files: list[ResultFile], known: list[Config]) -> Config:
    """The configuration a run directory belongs to, from its run config (modality + format)."""
    run_config = next((f.run_config for f in files if f.run_config), {})
    modality, fmt = run_config.get("modality"), run_config.get("format")
    if isinstance(modality, str) and "_" in modality:  # some merged files say "text_json"
        modality, _, fmt = modality.partition("_")
    if modality == "image":
        fmt = None
    matches = [c for c in known if c.modality == modality and c.format == fmt]
    if len(matches) == 1:
        return matches[0]
    choices = ", ".join(c.name for c in matches) or "none in the results root"
    raise ResultFileError(
        f"{run_dir}: cannot tell which configuration this run belongs to (modality={modality!r}, "
        f"format={fmt!r}; candidates: {choices}); name it: --run-dir {run_dir}=<variant>/<modality_format>"
    )


def scan_tree(
    results_root: str | Path,
    tasks: dict[int, Task],
    task_list: str | Path,
    data_root: str | Path,
    run_dirs: list[tuple[Path, str | None]] = (),
    only: list[str] | None = None,
    named_configs: dict[Config, Path] | None = None,
) -> ScanReport:
    """Scan every configuration under ``results_root`` (plus ``named_configs``, which win); ``only``
    limits it to the named configurations.

    Unreadable files become problems, not crashes: the other configurations are still scanned.
    """
    results_root = Path(results_root)
    found, problems = discover_configs(results_root)
    found.update(named_configs or {})
    sources: dict[Config, list[ResultFile]] = {}
    for config, path in found.items():
        try:
            sources[config] = [load_result_file(path)]
        except ResultFileError as err:
            problems.append(str(err))
    for run_dir, config_name in run_dirs:
        try:
            config, files = load_run_dir_for(run_dir, config_name, list(found))
        except ValueError as err:
            problems.append(str(err))
            continue
        sources.setdefault(config, []).extend(files)
    index = SourceIndex(data_root)
    configs = [
        scan_config(config, files, tasks, index)
        for config, files in sorted(sources.items(), key=lambda kv: kv[0].name)
        if only is None or config.name in only
    ]
    return ScanReport(Path(results_root), Path(task_list), Path(data_root), configs, problems)


def skip_ids_report(scan: ConfigScan, results_root: Path, task_list: str, now: dt.datetime | None = None) -> dict:
    """The users' analyzer's ``skip_ids.json`` for one configuration (same keys, same meanings)."""
    file_dependency = [i for i in scan.absent if i in scan.unrunnable]
    incomplete = [i for i in scan.absent if i not in scan.unrunnable]
    reasons = {}
    for task_id in scan.absent:
        missing = scan.unrunnable.get(task_id)
        reasons[str(task_id)] = (
            "Missing source file(s): " + ", ".join(Path(p).name for p in missing) if missing else INCOMPLETE_REASON
        )
    result_file = scan.result_file
    try:
        result_file = result_file.relative_to(results_root)
    except ValueError:
        pass
    return {
        "metadata": {
            "result_file": str(result_file),
            "config": scan.config.variant,
            "modality": scan.config.modality,
            "format": scan.config.format,
            "analysis_time": (now or dt.datetime.now()).isoformat(),
            "master_task_list": task_list,
        },
        "statistics": {
            "total_tasks": scan.total_tasks,
            "completed": scan.completed,
            "success": len(scan.success),
            "error": len(scan.errors),
            "missing": len(scan.absent),
            "file_dependency_issues": len(file_dependency),
            "incomplete_runs": len(incomplete),
        },
        "skip_ids": scan.absent,
        "error_ids": sorted(scan.errors),
        "skip_reasons": reasons,
        "categorized": {"file_dependency_issues": file_dependency, "incomplete_runs": incomplete},
    }


def write_skip_reports(report: ScanReport) -> list[Path]:
    """Write ``skip_ids.json`` beside each configuration's compiled result file (atomically)."""
    written = []
    for scan in report.configs:
        if scan.result_file is None:
            continue
        target = scan.result_file.parent / "skip_ids.json"
        atomic_write_json(target, skip_ids_report(scan, report.results_root, str(report.task_list)))
        written.append(target)
    return written


def rescan_after_merge(reports, plan: Plan, data_root: Path, task_list: Path) -> ScanReport:
    """What is left in the configurations a merge wrote; refreshes their skip_ids.json."""
    merged = [r.config for r in reports if r.path is not None and not r.problem]
    named = {Config.parse(c): Path(f["path"]) for c, f in plan.result_files.items()}
    report = scan_tree(Path(plan.results_root), load_tasks(task_list), task_list, data_root, only=merged,
                       named_configs=named)
    write_skip_reports(report)
    return report
