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
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import atomic_write_bytes, dump_json, fault_point, sha256_file
from .derived import refresh as refresh_derived
from .derived import aggregate_type_scores, summary_tolerance, type_scores, update_summary, write_merge_report
from .results import ResultFile, ResultFileError, item_ok, load_result_file, recompute_aggregates
from .inference.scoring import in_convention, not_run_pass
from .rundir import RunDir, read_records

ITEM_KEYS = ("id", "FileName", "QuestionType", "SubQType", "Question", "Reference", "Prediction", "Metrics",
             "ProcessingTime")
PROVENANCE_KEY = "provenance"  # in merged items as in shard records


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
    summary_scores: tuple[dict, dict] | None = None  # its modality_summary scores before, after (aggregates)
    summary_tolerance: float = 1e-6
    summary_kept: list[str] = field(default_factory=list)  # modality_summary.csv cells left as they were

    def to_json(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def shard_records(run_dir: Path) -> list[tuple[tuple, dict]]:
    """Every record of every attempt, with a sort key (attempt, file, line) for "newer wins"."""
    found = []
    for path in RunDir(run_dir).record_files():
        for line, record in enumerate(read_records(path)):
            provenance = record.get("provenance") or {}
            found.append(((provenance.get("attempt", 0), str(path), line), record))
    return found


def run_dir_records(files: list[ResultFile], config: str) -> list[tuple[tuple, dict]]:
    """The users' own rerun outputs (results_*.json, checkpoint.json) as records of one config."""
    found = []
    for rank, result_file in enumerate(files):
        for line, item in enumerate(result_file.items):
            found.append(((0, f"{rank:04d}", line), dict(item, provenance={"config": config,
                                                                            "source": str(result_file.path)})))
    return found


def best_records(records: list[tuple[tuple, dict]]) -> dict[str, dict[int, dict]]:
    """config -> id -> the record to merge: success over error, then the newest."""
    best: dict[str, dict[int, tuple[tuple, dict]]] = {}
    for key, record in records:
        config = (record.get("provenance") or {}).get("config")
        if not config or not isinstance(record.get("id"), int):
            continue
        rank = (item_ok(record), key)
        current = best.setdefault(config, {}).get(record["id"])
        if current is None or rank >= current[0]:
            best[config][record["id"]] = (rank, record)
    return {c: {i: r for i, (_, r) in ids.items()} for c, ids in best.items()}


def to_item(record: dict, with_provenance: bool) -> dict:
    item = {k: record[k] for k in ITEM_KEYS if k in record}
    if with_provenance and record.get("provenance"):
        item[PROVENANCE_KEY] = record["provenance"]
    return item


def merge_items(items: list[dict], new: dict[int, dict], overwrite: bool, with_provenance: bool,
                report: ConfigMerge) -> list[dict]:
    """The file's items with the new records applied, sorted by id (stable)."""
    by_id: dict[int, list[int]] = {}
    for pos, item in enumerate(items):
        by_id.setdefault(item["id"], []).append(pos)
    merged = list(items)
    drop: set[int] = set()
    not_run = not_run_pass(items)
    for task_id, record in sorted(new.items()):
        candidate = to_item(record, with_provenance)
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


def merge_config(config: str, path: Path, new: dict[int, dict], *, expected: set[str] | None, overwrite: bool,
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
    if items != result.items:
        before, after = type_scores(result.items), type_scores(items)
        report.scores = {t: [before.get(t), after.get(t)] for t in sorted(set(before) | set(after))}
        types = {item["id"]: str(item.get("QuestionType")) for item in items}
        for task_id in sorted(report.replaced + report.inserted + report.overwritten):
            report.changed_by_type.setdefault(types.get(task_id), []).append(task_id)
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
            fault_point(f"{target}: backup written")
            atomic_write_bytes(target, payload)
    aggregates = rebuilt.get("aggregate_metrics")
    if isinstance(aggregates, dict):  # after the file itself: a rerun finishes the job
        report.derived = [str(p) for p in refresh_derived(path, aggregates, dry_run=dry_run)]
    old = result.data.get("aggregate_metrics") if isinstance(result.data, dict) else None
    if report.changed and isinstance(aggregates, dict):  # the variant's summary follows (refresh_summaries)
        report.summary_scores = (aggregate_type_scores(old, result.items) if isinstance(old, dict) else {},
                                 aggregate_type_scores(aggregates, items))
        report.summary_tolerance = summary_tolerance(aggregates)
    return report


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


def merge(
    result_files: dict[str, Path],
    records: list[tuple[tuple, dict]],
    *,
    results_root: Path,
    planned_hashes: dict[str, str] | None = None,
    run_dir: Path | None = None,
    overwrite: bool = False,
    force: bool = False,
    dry_run: bool = False,
    with_provenance: bool = True,
    recompute_aggregates: bool = False,
) -> list[ConfigMerge]:
    """Merge ``records`` into each configuration's file; returns what happened per configuration."""
    now = dt.datetime.now()
    best = best_records(records)
    run = RunDir(run_dir) if run_dir is not None else None
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
                reports.append(merge_config(config, path, best[config], expected=expected, overwrite=overwrite,
                                            force=force, dry_run=dry_run, with_provenance=with_provenance, now=now,
                                            about_to_write=remember, recompute_aggregates=recompute_aggregates))
            except OSError as err:  # disk full, quota, permissions: this file keeps its old content
                where = err.filename or path
                reports.append(ConfigMerge(config, path, problem=f"{where}: cannot write ({err.strerror}); "
                                                                 f"{path} was left as it was. Free space, then merge again"))
    return reports


def merge_run(run_dir: Path | None, results_root: Path | None, sources: list[tuple[Path, str | None]] = (), *,
              overwrite: bool = False, force: bool = False, dry_run: bool = False, with_provenance: bool = True,
              recompute_aggregates: bool = False) -> tuple[list[ConfigMerge], list[str], dict]:
    """Merge a run directory's shards and/or the users' own run directories into a results root.

    Returns the per-configuration outcome, the problems (unreadable inputs), and the run's plan.
    """
    from .benchmark import Config
    from .scan import discover_configs, load_run_dir_for

    run = RunDir(run_dir) if run_dir is not None else None
    plan = run.load() if run is not None and run.is_run() else {}
    planned_root = Path(plan["results_root"]).resolve() if plan.get("results_root") else None
    results_root = results_root or planned_root
    if results_root is None:
        raise ValueError("say where to merge: --into RESULTS_ROOT (or give a run directory with a plan.json)")
    if Path(results_root).resolve() != planned_root:  # --into another tree: the plan's files are not these
        plan = {k: v for k, v in plan.items() if k != "result_files"}
        plan["results_root"] = str(results_root)
    result_files, problems = discover_configs(results_root)
    result_files.update({Config.parse(c): Path(f["path"]) for c, f in plan.get("result_files", {}).items()})
    records = shard_records(run_dir) if run_dir is not None else []
    for source, config_name in sources:
        try:
            config, files = load_run_dir_for(source, config_name, list(result_files))
        except ValueError as err:
            problems.append(str(err))
            continue
        records += run_dir_records(files, config.name)
    planned = {c: f["sha256"] for c, f in plan.get("result_files", {}).items()} or None
    reports = merge({c.name: p for c, p in result_files.items()}, records, results_root=results_root,
                    planned_hashes=planned, run_dir=run_dir, overwrite=overwrite, force=force, dry_run=dry_run,
                    with_provenance=with_provenance, recompute_aggregates=recompute_aggregates)
    problems += [r.problem for r in reports if r.problem]
    refresh_summaries(reports, dry_run)
    if run_dir is not None and not dry_run and any(r.changed for r in reports):
        write_merge_report(run.merge_report_stem, merge_rows(reports))
    plan["results_root"] = str(results_root)
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
