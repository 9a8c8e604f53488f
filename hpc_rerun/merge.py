"""merge-shards: put new answers into the existing result files without ever losing a result.

Per (config, id) the best record wins (success over error, newer attempt over older). A result file
gets its ``[ERROR]`` items replaced and its absent ids inserted; an existing success is replaced only
with ``overwrite``. Layout, key order and item schema are kept, items are sorted by id, aggregates
are recomputed in the file's own shape, and ``checkpoint.json`` beside it is rebuilt.

Safety: one exclusive lock per results root; every file goes through temp + fsync + rename + folder
fsync; the original is backed up beside it first; a file that does not parse, or that changed since
the run was planned, is left alone unless forced. A second merge of the same records changes no byte.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

from .aggregates import TypeMetrics, recompute_aggregates, type_scores
from .atomic import atomic_write_bytes, dump_json, sha256_file
from .benchmark import Config
from .derived import aggregate_type_metrics, summary_tolerance, update_summary, write_merge_report
from .derived import refresh as refresh_derived
from .paper_table import refresh_table
from .results import ResultFile, ResultFileError, item_ok, load_result_file
from .rundir import Plan, Provenance, Record, RunDir, best_records
from .scan import discover_configs, load_run_dir_for
from .scoring.metrics import in_convention, not_run_pass


class MergeLocked(RuntimeError):
    pass


@dataclass
class ConfigMerge:
    config: str
    path: Path | None
    replaced: list[int] = field(default_factory=list)  # [ERROR] items replaced
    inserted: list[int] = field(default_factory=list)  # absent ids added
    overwritten: list[int] = field(default_factory=list)  # successes replaced (overwrite)
    kept_success: list[int] = field(default_factory=list)  # new records not applied: a success exists
    still_errors: list[int] = field(default_factory=list)  # merged, but the best record is an error
    changed: bool = False
    backup: Path | None = None
    problem: str | None = None
    aggregates_kept: str | None = None  # why aggregate_metrics were left as they were (no rule reproduces them)
    derived: list[str] = field(default_factory=list)  # aggregate_metrics.csv/.md beside the file, refreshed
    scores: dict[str, list] = field(default_factory=dict)  # question type -> [score before, after] (changed files)
    changed_by_type: dict[str, list[int]] = field(default_factory=dict)  # question type -> ids replaced or added
    summary_scores: tuple[TypeMetrics, TypeMetrics] | None = None  # summary/paper-table metrics before, after
    summary_tolerance: float = 1e-6
    summary_kept: list[str] = field(default_factory=list)  # modality_summary.csv cells left as they were
    before: ResultFile | None = field(default=None, repr=False)  # the file as read (for the tables derived from it)
    after: dict | None = field(default=None, repr=False)  # its new top level

    def to_json(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()
                if k not in ("before", "after")}


def user_records(files: list[ResultFile], config: str) -> list[Record]:
    """The users' own rerun outputs (results_*.json, checkpoint.json) as records of one config, oldest first."""
    return [replace(Record.from_dict(item), provenance=Provenance(config=config, source=str(result_file.path)))
            for result_file in files for item in result_file.items]


def merge_items(items: list[dict], new: dict[int, Record], overwrite: bool, with_provenance: bool,
                report: ConfigMerge) -> list[dict]:
    """The file's items with the new records applied, sorted by id (stable)."""
    by_id: dict[int, list[int]] = {}
    for pos, item in enumerate(items):
        by_id.setdefault(item["id"], []).append(pos)
    merged = list(items)
    drop: set[int] = set()
    not_run = not_run_pass(items)
    for task_id, record in sorted(new.items()):
        candidate = record.to_item(with_provenance)
        if "Metrics" in candidate:  # the file's own Pass for chart code that did not run
            candidate["Metrics"] = in_convention(candidate["Metrics"], not_run)
        positions = by_id.get(task_id)
        if positions is not None and len(positions) == 1 and items[positions[0]] == candidate:
            continue  # merged before
        if positions is None:
            merged.append(candidate)
            report.inserted.append(task_id)
        else:
            existing_ok = any(item_ok(items[p]) for p in positions)
            if existing_ok and not (overwrite and item_ok(candidate)):
                report.kept_success.append(task_id)
                continue
            (report.overwritten if existing_ok else report.replaced).append(task_id)
            merged[positions[0]] = candidate
            drop.update(positions[1:])
        if not item_ok(candidate):
            report.still_errors.append(task_id)
    merged = [item for pos, item in enumerate(merged) if pos not in drop]
    merged.sort(key=lambda item: item["id"])
    return merged


def rebuild(result: ResultFile, items: list[dict], recompute: bool = False) -> tuple[dict, str | None]:
    """The file's top level with new items and aggregates (by the file's own rule; see results.py), every
    other key as it was, in order; and why its aggregates were left as they were, if they were."""
    out, why = {}, None
    for key, value in result.data.items():
        if key == "results":
            out[key] = items
        elif key == "aggregate_metrics" and isinstance(value, dict):
            out[key], kept = recompute_aggregates(value, result.items, items, force=recompute)
            if kept and items != result.items:
                why = (f"{result.path}: aggregate_metrics left as they were: {kept}. Use --recompute-aggregates "
                       "to rewrite them from the items")
        else:
            out[key] = value
    return out, why


def backup(path: Path, now: dt.datetime) -> Path:
    """Copy the original beside it once (a rerun after a crash reuses an identical backup)."""
    data = path.read_bytes()
    for existing in sorted(path.parent.glob(f"{path.name}.bak-*")):
        if existing.stat().st_size == len(data) and existing.read_bytes() == data:
            return existing
    stamp = now.strftime('%Y%m%dT%H%M%S')
    target = path.with_name(f"{path.name}.bak-{stamp}")
    number = 1
    while target.exists():  # two merges within one second: never overwrite an earlier backup
        target = path.with_name(f"{path.name}.bak-{stamp}-{number}")
        number += 1
    atomic_write_bytes(target, data)
    return target


@contextmanager
def results_lock(results_root: Path):
    """One merge at a time per results root (an flock, released if the process dies)."""
    lock_path = results_root / ".hpc-rerun.lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MergeLocked(f"{results_root}: another merge is running (lock {lock_path}); wait for it") from None
        yield
    finally:
        os.close(fd)


def merge_config(config: str, path: Path, new: dict[int, Record], *, expected: set[str] | None, overwrite: bool,
                 force: bool, dry_run: bool, with_provenance: bool, now: dt.datetime,
                 about_to_write=lambda digest: None, recompute_aggregates: bool = False) -> ConfigMerge:
    report = ConfigMerge(config, path)
    try:
        result = load_result_file(path)
    except ResultFileError as err:
        report.problem = f"{err} (not merged)"
        return report
    if expected and not force:
        digest = sha256_file(path)
        if digest not in expected:
            report.problem = (f"{path}: changed since the run was planned (sha256 {digest[:12]}); not merged. "
                              "Check it, then merge with --force to merge into it anyway")
            return report
    items = merge_items(result.items, new, overwrite, with_provenance, report)
    rebuilt, report.aggregates_kept = rebuild(result, items, recompute_aggregates)
    report.before, report.after = result, rebuilt
    writes = [(path, dump_json(rebuilt))]
    checkpoint = path.parent / "checkpoint.json"
    if checkpoint.exists():  # the fork's resume file: rerun exactly what is not a success
        checkpoint_data = {"results": items, "processed_ids": [i["id"] for i in items if item_ok(i)]}
        writes.append((checkpoint, dump_json(checkpoint_data)))
    # Each file is compared with what it should be, so a rerun after a crash finishes the job.
    pending = [(target, payload) for target, payload in writes if target.read_bytes() != payload]
    report.changed = bool(pending)
    if not dry_run:
        for target, payload in pending:
            saved = backup(target, now)
            if target == path:
                report.backup = saved
                about_to_write(hashlib.sha256(payload).hexdigest())
            atomic_write_bytes(target, payload)
    return report


def score_changes(report: ConfigMerge) -> None:
    """The configuration's scores per question type before and after, and the ids changed per type."""
    old_items, items = report.before.items, report.after["results"]
    if items == old_items:
        return
    before, after = type_scores(old_items), type_scores(items)
    report.scores = {t: [before.get(t), after.get(t)] for t in sorted(set(before) | set(after))}
    types = {item["id"]: str(item.get("QuestionType")) for item in items}
    for task_id in sorted(report.replaced + report.inserted + report.overwritten):
        report.changed_by_type.setdefault(types.get(task_id), []).append(task_id)


def refresh_tables(report: ConfigMerge, dry_run: bool) -> None:
    """aggregate_metrics.csv/.md beside the file, after the file itself (a rerun finishes the job), and the
    scores its variant's summary needs (``refresh_summaries``)."""
    aggregates = report.after.get("aggregate_metrics")
    if not isinstance(aggregates, dict):
        return
    report.derived = [str(p) for p in refresh_derived(report.path, aggregates, dry_run=dry_run)]
    old = report.before.data.get("aggregate_metrics")
    if report.changed:
        report.summary_scores = (aggregate_type_metrics(old, report.before.items) if isinstance(old, dict)
                                 else TypeMetrics(), aggregate_type_metrics(aggregates, report.after["results"]))
        report.summary_tolerance = summary_tolerance(aggregates)


def refresh_summaries(reports: list[ConfigMerge], dry_run: bool) -> None:
    """Each variant's modality_summary.csv, where it exists, for the configurations the merge changed."""
    by_variant: dict[Path, list[ConfigMerge]] = {}
    for report in reports:
        if report.summary_scores and report.path is not None:  # set only for files the merge changed
            by_variant.setdefault(report.path.parent.parent, []).append(report)
    for variant_dir, changed in by_variant.items():
        paths, warnings = update_summary(variant_dir, {r.path.parent.name: r.summary_scores for r in changed},
                                         {r.path.parent.name: r.summary_tolerance for r in changed}, dry_run=dry_run)
        for report in changed:
            report.derived += [str(p) for p in paths]
            report.summary_kept += warnings.get(report.path.parent.name, [])
    if by_variant:  # the users' paper table at the results root, where it exists
        changed = [r for reports_of_variant in by_variant.values() for r in reports_of_variant]
        paths, warnings = refresh_table(changed[0].path.parent.parent.parent,
                                        {r.config: r.summary_scores for r in changed}, dry_run=dry_run)
        for report in changed:
            report.derived += [str(p) for p in paths]
            report.summary_kept += [w for w in warnings if report.config in w]


def by_config(records: list[Record]) -> dict[str, dict[int, Record]]:
    """config -> id -> the record to merge (``rundir.best_records``: success over error, then the newest)."""
    best: dict[str, dict[int, Record]] = {}
    for (config, task_id), record in best_records(records).items():
        best.setdefault(config, {})[task_id] = record
    return best


def merge(
    result_files: dict[str, Path],
    records: list[Record],
    *,
    results_root: Path,
    planned_hashes: dict[str, str] | None = None,
    run: RunDir | None = None,
    overwrite: bool = False,
    force: bool = False,
    dry_run: bool = False,
    with_provenance: bool = True,
    recompute_aggregates: bool = False,
) -> list[ConfigMerge]:
    """Merge ``records`` (oldest first) into each configuration's file; returns what happened per configuration."""
    now = dt.datetime.now()
    best = by_config(records)
    ledger = run.load_ledger() if run is not None else {}
    reports = []
    with nullcontext() if dry_run else results_lock(results_root):
        for config in sorted(best):
            path = result_files.get(config)
            if path is None:
                reports.append(ConfigMerge(config, None, problem=f"{config}: no result file for this configuration "
                                                                 f"under {results_root}; nothing merged"))
                continue
            expected = None
            if planned_hashes and config in planned_hashes:
                expected = {planned_hashes[config], *ledger.get(config, [])}

            def remember(digest: str, config=config) -> None:
                """Record our own result before writing it, so a rerun after a crash accepts it."""
                if run is not None:
                    ledger[config] = sorted(set(ledger.get(config, [])) | {digest})
                    run.save_ledger(ledger)

            try:
                report = merge_config(config, path, best[config], expected=expected, overwrite=overwrite,
                                      force=force, dry_run=dry_run, with_provenance=with_provenance, now=now,
                                      about_to_write=remember, recompute_aggregates=recompute_aggregates)
                if report.after is not None:
                    score_changes(report)
                    refresh_tables(report, dry_run)
                    report.before = report.after = None  # one file in memory at a time
                reports.append(report)
            except OSError as err:  # disk full, quota, permissions: this file keeps its old content
                where = err.filename or path
                reports.append(ConfigMerge(config, path, problem=f"{where}: cannot write ({err.strerror}); {path} "
                                                                 "was left as it was. Free space, then merge again"))
    return reports


def merge_run(run: RunDir | None, results_root: Path | None, sources: list[tuple[Path, str | None]] = (), *,
              overwrite: bool = False, force: bool = False, dry_run: bool = False, with_provenance: bool = True,
              recompute_aggregates: bool = False) -> tuple[list[ConfigMerge], list[str], Plan]:
    """Merge a run directory's shards and/or the users' own run directories into a results root: the records
    (rundir), the result files (merge_config), then the tables derived from them (derived) and the report.

    Returns the per-configuration outcome, the problems (unreadable inputs), and the plan as merged (its
    results root the one merged into).
    """
    plan = run.plan() if run is not None and run.is_run() else Plan()
    planned_root = Path(plan.results_root).resolve() if plan.results_root else None
    results_root = results_root or planned_root
    if results_root is None:
        raise ValueError("say where to merge: --into RESULTS_ROOT (or give a run directory with a plan.json)")
    if Path(results_root).resolve() != planned_root:  # --into another tree: the plan's files are not these
        plan = replace(plan, result_files={})
    plan.results_root = str(results_root)
    result_files, problems = discover_configs(results_root)
    result_files.update({Config.parse(c): Path(f["path"]) for c, f in plan.result_files.items()})
    records = run.records() if run is not None else []
    for source, config_name in sources:
        try:
            config, files = load_run_dir_for(source, config_name, list(result_files))
        except ValueError as err:
            problems.append(str(err))
            continue
        records += user_records(files, config.name)
    reports = merge({c.name: p for c, p in result_files.items()}, records, results_root=results_root,
                    planned_hashes=plan.planned_hashes() or None, run=run, overwrite=overwrite, force=force,
                    dry_run=dry_run, with_provenance=with_provenance, recompute_aggregates=recompute_aggregates)
    problems += [r.problem for r in reports if r.problem]
    refresh_summaries(reports, dry_run)
    if run is not None and not dry_run and any(r.changed for r in reports):
        write_merge_report(run.merge_report_stem, merge_rows(reports))
    return reports, problems, plan


def merge_rows(reports: list[ConfigMerge]) -> list[dict]:
    """The before/after rows of the configurations a merge changed: every question type, the ids it changed."""
    rows = []
    for report in reports:
        if not report.changed:
            continue
        for question_type, (before, after) in report.scores.items():
            rows.append({"config": report.config, "question_type": question_type, "before": before, "after": after,
                         "changed": report.changed_by_type.get(question_type, [])})
    return rows
