"""rescore: every answered item's Metrics recomputed from its own Reference and Prediction.

Why: a merged rerun is scored by this scorer, the items around it by the benchmark's; the table a paper
prints is only consistent if both agree. ``rescore`` shows where they do not (per configuration, per metric,
with examples) and, with ``write``, rewrites those items' Metrics and their aggregates (by the file's own rule,
untouched groups as they were), atomically with a backup, as merge does. Visualization code runs in the
sandbox, on a thread pool (each run is its own process).
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import atomic_write_bytes, dump_json
from .benchmark import ERROR_PREFIX, Task
from .derived import refresh as refresh_derived
from .merge import backup, rebuild, results_lock
from .results import ResultFileError, load_result_file
from .scan import discover_configs
from .scoring.metrics import Scored, in_convention, not_run_pass, score_answer

EXAMPLES = 3


@dataclass
class ConfigRescore:
    config: str
    path: Path
    items: int = 0  # answered items scored
    changed_items: int = 0  # of which the stored Metrics differ
    changed: dict[str, int] = field(default_factory=dict)  # metric -> items whose stored value differs
    examples: list[dict] = field(default_factory=list)
    sandbox_layers: dict[str, int] = field(default_factory=dict)  # layer -> Visualization items scored under it
    written: bool = False
    aggregates_kept: str | None = None
    problem: str | None = None

    def to_json(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def item_task(item: dict) -> Task:
    """The task as the item itself has it: its own Reference is what its Metrics were scored against."""
    return Task(item["id"], item.get("FileName", ""), item.get("QuestionType", ""), item.get("SubQType"),
                item.get("Question", ""), item.get("Reference", ""))


def rescore_file(config: str, path: Path, data_root: Path, *, write: bool, jobs: int, recompute: bool = False,
                 progress: Callable[[int], None] = lambda n: None) -> ConfigRescore:
    report = ConfigRescore(config, path)
    try:
        result = load_result_file(path)
    except ResultFileError as err:
        report.problem = f"{err} (not rescored)"
        return report
    answered = [item for item in result.items if isinstance(item, dict)
                and not str(item.get("Prediction", "")).startswith(ERROR_PREFIX)]
    report.items = len(answered)

    def rescored(item: dict) -> Scored:
        try:
            return score_answer(item_task(item), str(item.get("Prediction", "")), data_root)
        finally:
            progress(1)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        not_run = not_run_pass(result.items)
        scored = list(pool.map(rescored, answered))
    metrics = [in_convention(s.metrics, not_run) for s in scored]
    notes = {id(item): s.note for item, s in zip(answered, scored) if s.note}
    for s in scored:
        if s.sandbox_layer:
            report.sandbox_layers[s.sandbox_layer] = report.sandbox_layers.get(s.sandbox_layer, 0) + 1
    new_metrics = {id(item): m for item, m in zip(answered, metrics) if m != item.get("Metrics")}
    for item in answered:
        if id(item) not in new_metrics:
            continue
        old, new = item.get("Metrics") or {}, new_metrics[id(item)]
        for name in sorted(set(old) | set(new)):
            if old.get(name) != new.get(name):
                report.changed[name] = report.changed.get(name, 0) + 1
        if len(report.examples) < EXAMPLES:
            report.examples.append({"id": item["id"], "stored": old, "rescored": new}
                                   | ({"note": notes[id(item)]} if id(item) in notes else {}))
    report.changed_items = len(new_metrics)
    if not write or not new_metrics:
        return report
    items = [dict(item, Metrics=new_metrics[id(item)]) if id(item) in new_metrics else item for item in result.items]
    data, report.aggregates_kept = rebuild(result, items, recompute)
    backup(path, dt.datetime.now())
    atomic_write_bytes(path, dump_json(data))
    if isinstance(data.get("aggregate_metrics"), dict):
        refresh_derived(path, data["aggregate_metrics"])
    report.written = True
    return report


def rescore(results_root: Path, data_root: Path, *, write: bool = False, recompute: bool = False,
            only: list[str] | None = None, jobs: int | None = None,
            progress: Callable[[int], None] = lambda n: None) -> list[ConfigRescore]:
    """Rescore every configuration's file under ``results_root`` (or those in ``only``)."""
    files, problems = discover_configs(results_root)
    jobs = jobs or min(8, os.cpu_count() or 1)
    chosen = sorted((c.name, p) for c, p in files.items() if not only or c.name in only)
    reports = [ConfigRescore("", Path(results_root), problem=p) for p in problems]
    with results_lock(Path(results_root)) if write else nullcontext():
        for config, path in chosen:
            reports.append(rescore_file(config, path, data_root, write=write, jobs=jobs, recompute=recompute,
                                        progress=progress))
    return reports
