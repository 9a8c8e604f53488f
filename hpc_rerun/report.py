"""The ``report`` step over a results tree: every derived file of the users' brought up to date from the
aggregates stored in the result files (tables beside each file, each variant's summary and charts, the paper
table at the root). It changes no value, so it rewrites only files that disagree with the aggregates."""

from __future__ import annotations

from pathlib import Path

from .derived import aggregate_type_metrics, refresh, summary_tolerance, update_summary, write_charts
from .paper_table import refresh_table
from .results import ResultFileError, load_result_file
from .scan import discover_configs


def regenerate(results_root: Path, create: bool = False, charts: bool = False, dry_run: bool = False
               ) -> tuple[dict[str, list[str]], int, list[str], list[str]]:
    """The ``report`` step over a results tree: each configuration's tables refreshed from its stored
    aggregate_metrics (``create``: also where there are none), each variant's modality_summary.csv (see
    ``update_summary``), the users' paper table (``paper_table.refresh_table``), and with ``charts`` the
    charts of each variant. Returns ({configuration, "<variant> summary", "paper table" or "<variant>
    charts": paths written}, configurations checked, warnings, problems: unreadable result files)."""
    files, problems = discover_configs(results_root)
    written, metrics, tolerance, warnings = {}, {}, {}, []
    for config, path in sorted(files.items(), key=lambda kv: kv[0].name):
        try:
            result = load_result_file(path)
        except ResultFileError as err:
            problems.append(str(err))
            continue
        aggregates = result.data.get("aggregate_metrics") if isinstance(result.data, dict) else None
        if isinstance(aggregates, dict) and aggregates:
            variant_dir, leaf = path.parent.parent, path.parent.name
            written[config.name] = [str(p) for p in refresh(path, aggregates, create=create, dry_run=dry_run)]
            metrics.setdefault(variant_dir, {})[leaf] = aggregate_type_metrics(aggregates, result.items)
            tolerance.setdefault(variant_dir, {})[leaf] = summary_tolerance(aggregates)
    for variant_dir, by_leaf in metrics.items():
        paths, notes = update_summary(variant_dir, {leaf: (m, m) for leaf, m in by_leaf.items()},
                                      tolerance[variant_dir], create=create, dry_run=dry_run)
        written[f"{variant_dir.name} summary"] = [str(p) for p in paths]
        warnings += [note for leaf_notes in notes.values() for note in leaf_notes]
        if charts:
            scores = {leaf: m.scores() for leaf, m in by_leaf.items()}
            charted = [] if dry_run else write_charts(variant_dir, scores)
            written[f"{variant_dir.name} charts"] = [str(p) for p in charted]
    by_config = {f"{v.name}/{leaf}": (m, m) for v, by_leaf in metrics.items() for leaf, m in by_leaf.items()}
    paths, notes = refresh_table(Path(results_root), by_config, create=create, dry_run=dry_run)
    written["paper table"] = [str(p) for p in paths]
    return written, sum(map(len, metrics.values())), warnings + notes, problems
