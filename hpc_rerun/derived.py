"""The tables users derive from a result file's ``aggregate_metrics``, in their own shapes.

Beside each result file the users keep ``aggregate_metrics.csv`` (pandas, every number with 6 decimals) and
``aggregate_metrics.md`` (a pandas/tabulate Markdown table, metrics as 2-decimal text, ProcessingTime as a
number): one row per question type in the file's order, then ``Overall`` where the file has an overall
level; columns EM, F1, ROUGE-L, SacreBLEU, Pass, ECR, then any others (ProcessingTime). ECR/Pass stored as
fractions are shown as percentages. A merge that changes the aggregates leaves these stale; ``refresh``
rewrites the ones that exist (atomically), ``report`` also those asked for.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from .atomic import atomic_write_bytes

CSV_NAME, MARKDOWN_NAME = "aggregate_metrics.csv", "aggregate_metrics.md"
SUMMARY_NAME = "modality_summary.csv"  # per variant: configurations x question types, then Overall
SUMMARY_FORMATS = ["image", "latex", "html", "markdown", "json", "csv"]  # where a new configuration's row goes
FIRST_COLUMNS = ["EM", "F1", "ROUGE-L", "SacreBLEU", "Pass", "ECR"]
SHARES = ("Pass", "ECR")


def aggregate_frame(aggregates: dict):
    """The users' DataFrame: question types (then Overall) by metric."""
    import pandas as pd

    rows = dict(aggregates.get("by_question_type", aggregates))
    if "overall" in aggregates:
        rows["Overall"] = aggregates["overall"]
    frame = pd.DataFrame.from_dict({k: v for k, v in rows.items() if isinstance(v, dict)}, orient="index")
    columns = [c for c in FIRST_COLUMNS if c in frame.columns] + [c for c in frame.columns if c not in FIRST_COLUMNS]
    frame = frame[columns]
    shares = [c for c in SHARES if c in frame.columns]
    if shares and frame[shares].max().max() <= 1:
        frame[shares] = frame[shares] * 100
    return frame


def aggregate_tables(aggregates: dict) -> dict[str, bytes]:
    """{file name: content} of ``aggregate_metrics.csv`` and ``.md`` as the users' script writes them."""
    import pandas as pd

    frame = aggregate_frame(aggregates)
    markdown = frame.copy()
    as_text = [c for c in markdown.columns if c != "ProcessingTime"]
    for column in as_text:
        markdown[column] = markdown[column].map(lambda v: "" if pd.isna(v) else f"{v:.2f}")
    text_columns = [n + 1 for n, c in enumerate(markdown.columns) if c in as_text]  # + 1: the index comes first
    return {CSV_NAME: frame.to_csv(float_format="%f").encode(),
            MARKDOWN_NAME: markdown.to_markdown(floatfmt=".2f", disable_numparse=text_columns).encode()}


def refresh(result_path: Path, aggregates: dict, create: bool = False, dry_run: bool = False) -> list[Path]:
    """Rewrite the derived tables beside ``result_path`` that exist (all of them with ``create``) and differ
    from what ``aggregates`` give; returns the files written (or, with ``dry_run``, that would be)."""
    written = []
    for name, content in aggregate_tables(aggregates).items():
        path = Path(result_path).parent / name
        if (path.exists() or create) and (not path.exists() or path.read_bytes() != content):
            if not dry_run:
                atomic_write_bytes(path, content)
            written.append(path)
    return written


# The users' score per question type (their modality_summary.csv): the mean of these metrics, ECR/Pass as
# percentages of all the type's items.
TYPE_SCORE_METRICS = {"Data Analysis": ("EM", "F1", "ROUGE-L"), "Visualization": ("ECR", "Pass")}
DEFAULT_SCORE_METRICS = ("EM", "F1")


def type_scores(items: list[dict]) -> dict[str, float]:
    """Per question type, the users' score of these items."""
    from .results import ShareRule, items_by_type, metric_means

    scores = {}
    for question_type, group in items_by_type(items).items():
        means = metric_means(group, ShareRule(100.0, False), with_time=False)
        wanted = TYPE_SCORE_METRICS.get(question_type, DEFAULT_SCORE_METRICS)
        if all(m in means for m in wanted):
            scores[str(question_type)] = sum(means[m] for m in wanted) / len(wanted)
    return scores


def write_merge_report(stem: Path, rows: list[dict]) -> list[Path]:
    """``<stem>.md`` and ``<stem>.png`` (rundir.py: ``merge-report`` in the run directory): per configuration and question type the
    score before and after a merge, and the items it changed. ``rows``: config, question_type, before,
    after, changed (ids)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    frame = pd.DataFrame(rows, columns=["config", "question_type", "before", "after", "changed"])
    frame["change"] = frame["after"] - frame["before"]
    lines = ["# Merge: scores before and after", "",
             "Score per question type as the users' modality summary counts it: mean of EM and F1 (Data "
             "Analysis: EM, F1, ROUGE-L; Visualization: ECR and Pass, % of the type's items).", ""]
    table = frame.assign(changed=frame["changed"].map(lambda ids: ", ".join(map(str, ids)) or "-"))
    lines.append(table.to_markdown(index=False, floatfmt=".2f"))
    markdown = stem.with_suffix(".md")
    atomic_write_bytes(markdown, ("\n".join(lines) + "\n").encode())
    labels = [f"{r.config}\n{r.question_type}" for r in frame.itertuples()]
    figure, axis = plt.subplots(figsize=(max(6, 0.9 * len(labels)), 4.5))
    positions = range(len(labels))
    axis.bar([p - 0.2 for p in positions], frame["before"].fillna(0), width=0.4, label="before")
    bars = axis.bar([p + 0.2 for p in positions], frame["after"].fillna(0), width=0.4, label="after")
    axis.bar_label(bars, labels=[f"{v:.2f}" for v in frame["after"].fillna(0)], fontsize=7)
    axis.set_xticks(list(positions), labels, rotation=60, ha="right", fontsize=7)
    axis.set_ylabel("score")
    axis.set_title("Merge: score per configuration and question type")
    axis.legend()
    figure.tight_layout()
    chart = stem.with_suffix(".png")
    figure.savefig(chart, dpi=120)
    plt.close(figure)
    return [markdown, chart]


QUESTION_TYPES = ["Fact Checking", "Numerical Reasoning", "Structure Comprehending", "Data Analysis", "Visualization"]


def aggregate_type_scores(aggregates: dict, items: list[dict] | None = None) -> dict[str, float]:
    """The users' score per question type from a file's stored aggregates, in the users' order (shares as
    percentages; a Pass the file counts over ECR-true items, as found from ``items``, made a share of all
    the type's items, as their summary counts it)."""
    from .results import Level, is_rounded, items_by_type

    frame = aggregate_frame(aggregates)
    stored = aggregates.get("by_question_type", aggregates)
    rule = Level("types", stored, items_by_type(items), is_rounded(aggregates)).rule if items else None
    scores = {}
    for question_type in [t for t in QUESTION_TYPES if t in frame.index] + [t for t in frame.index if t not in
                                                                             QUESTION_TYPES + ["Overall"]]:
        row = frame.loc[question_type]
        wanted = TYPE_SCORE_METRICS.get(question_type, DEFAULT_SCORE_METRICS)
        if not all(m in row and row[m] == row[m] for m in wanted):  # missing or NaN
            continue
        values = {m: float(row[m]) for m in wanted}
        if rule is not None and rule.pass_over_ran and "Pass" in values:
            values["Pass"] = values["Pass"] * values["ECR"] / 100
        scores[question_type] = sum(values.values()) / len(values)
    return scores


def overall_score(scores: dict[str, float]) -> float:
    """The users' Overall: the mean of every metric value behind the type scores, pooled (a Data Analysis
    score stands for three values, the others for two), e.g. mix_latex's (2 FC + 2 NR + 2 SC + 3 DA + 2 Viz) / 11."""
    weights = {t: len(TYPE_SCORE_METRICS.get(t, DEFAULT_SCORE_METRICS)) for t in scores}
    return sum(scores[t] * weights[t] for t in scores) / sum(weights.values())


def summary_order(leaf: str) -> tuple:
    fmt = leaf.split("_", 1)[1] if "_" in leaf else leaf
    return (SUMMARY_FORMATS.index(fmt) if fmt in SUMMARY_FORMATS else len(SUMMARY_FORMATS), leaf)


def update_summary(variant_dir: Path, changes: dict[str, tuple[dict, dict]], tolerance: dict[str, float],
                   create: bool = False, dry_run: bool = False) -> tuple[list[Path], dict[str, list[str]]]:
    """Bring ``<variant>/modality_summary.csv`` up to date. ``changes``: configuration leaf -> (its type
    scores before, after) from its aggregates (equal for ``report``, which changes nothing). A cell whose
    scores the operation did not change keeps its stored text; where it disagrees with the aggregates by more
    than the leaf's ``tolerance`` (1e-6, or 0.01 from rounded aggregates) it is kept with a warning: stale, or
    made by a rule the items cannot show. Changed cells are rewritten and the row's Overall with them; rows
    of new configurations are added. Returns (paths written, leaf -> warnings)."""
    import pandas as pd

    path = variant_dir / SUMMARY_NAME
    if not path.exists() and not create:
        return [], {}
    frame = pd.read_csv(path, index_col=0) if path.exists() else pd.DataFrame(columns=[*QUESTION_TYPES, "Overall"])
    frame.index = frame.index.astype(str)
    warnings: dict[str, list[str]] = {}
    changed = False
    for leaf, (before, after) in changes.items():
        for column in [t for t in after if t not in frame.columns]:
            frame.insert(max(len(frame.columns) - 1, 0), column, float("nan"))
        if leaf not in frame.index:
            frame.loc[leaf] = pd.Series({**after, "Overall": overall_score(after)})
            changed = True
            continue
        touched = [t for t, value in after.items() if before.get(t) != value]
        for question_type in after:
            stored = frame.loc[leaf, question_type]
            if question_type in touched:
                frame.loc[leaf, question_type] = after[question_type]
            elif not abs(stored - after[question_type]) <= tolerance.get(leaf, 1e-6):
                warnings.setdefault(leaf, []).append(
                    f"{path}: {leaf} {question_type} is {stored} but its aggregate_metrics give "
                    f"{after[question_type]}: kept (stale, or made by another rule)")
        if touched:
            types = {t: float(frame.loc[leaf, t]) for t in QUESTION_TYPES if t in frame.columns
                     and frame.loc[leaf, t] == frame.loc[leaf, t]}
            frame.loc[leaf, "Overall"] = overall_score(types)
            changed = True
    if not changed:
        return [], warnings
    if not path.exists():
        frame = frame.loc[sorted(frame.index, key=summary_order)]
    if not dry_run:
        atomic_write_bytes(path, frame.to_csv().encode())
    return [path], warnings


def write_charts(variant_dir: Path, scores: dict[str, dict[str, float]]) -> list[Path]:
    """Per configuration ``<leaf>/<leaf>_scores.png`` (a bar per question type, then Overall) and per variant
    ``scores_heatmap.png`` (configurations x question types and Overall), each number written on the chart.
    ``scores``: configuration leaf -> question type -> score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written = []
    scores = {leaf: {**by_type, "Overall": overall_score(by_type)} for leaf, by_type in scores.items() if by_type}
    for leaf, by_type in scores.items():
        figure, axis = plt.subplots(figsize=(9, 4.5))
        labels = [textwrap.fill(t, 14) for t in by_type]
        colours = ["#4a78a8"] * (len(by_type) - 1) + ["#d9822b"]  # Overall apart, as the users' chart has it
        bars = axis.bar(labels, list(by_type.values()), color=colours, edgecolor="black")
        axis.bar_label(bars, labels=[f"{v:.2f}" for v in by_type.values()], fontweight="bold")
        axis.set_title(f"{leaf.upper()} - score by question type", fontweight="bold")
        axis.set_ylabel("Average Score")
        axis.set_ylim(0, max([*by_type.values(), 1]) * 1.2)
        figure.tight_layout()
        path = variant_dir / leaf / f"{leaf}_scores.png"
        figure.savefig(path, dpi=120)
        plt.close(figure)
        written.append(path)
    present = {t for by_type in scores.values() for t in by_type} - {"Overall"}
    types = [t for t in QUESTION_TYPES if t in present] + sorted(present - set(QUESTION_TYPES)) + ["Overall"]
    leaves = sorted(scores)
    grid = np.array([[scores[leaf].get(t, np.nan) for t in types] for leaf in leaves])
    figure, axis = plt.subplots(figsize=(1.8 * len(types) + 2, 0.6 * len(leaves) + 2))
    image = axis.imshow(grid, cmap="Blues", vmin=0, vmax=100, aspect="auto")
    axis.set_xticks(range(len(types)), types, rotation=20, ha="right")
    axis.set_yticks(range(len(leaves)), leaves)
    for (row, column), value in np.ndenumerate(grid):
        if value == value:
            axis.text(column, row, f"{value:.2f}", ha="center", va="center",
                      color="white" if value > 60 else "black")
    figure.colorbar(image, ax=axis, label="score")
    axis.set_title(f"{variant_dir.name}: score by configuration and question type")
    figure.tight_layout()
    path = variant_dir / "scores_heatmap.png"
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return written + [path]


def regenerate(results_root: Path, create: bool = False, charts: bool = False,
               dry_run: bool = False) -> tuple[dict[str, list[str]], int, list[str], list[str]]:
    """The ``report`` step over a results tree: each configuration's tables refreshed from its stored
    aggregate_metrics (``create``: also where there are none), each variant's modality_summary.csv (see
    ``update_summary``), and with ``charts`` the charts of each variant. Returns ({configuration, "<variant>
    summary" or "<variant> charts": paths written}, configurations checked, warnings, problems: unreadable
    result files)."""
    from .results import ResultFileError, load_result_file
    from .scan import discover_configs

    files, problems = discover_configs(results_root)
    written, scores, tolerance, warnings = {}, {}, {}, []
    for config, path in sorted(files.items(), key=lambda kv: kv[0].name):
        try:
            result = load_result_file(path)
        except ResultFileError as err:
            problems.append(str(err))
            continue
        aggregates = result.data.get("aggregate_metrics") if isinstance(result.data, dict) else None
        if isinstance(aggregates, dict) and aggregates:
            written[config.name] = [str(p) for p in refresh(path, aggregates, create=create, dry_run=dry_run)]
            scores.setdefault(path.parent.parent, {})[path.parent.name] = aggregate_type_scores(aggregates, result.items)
            tolerance.setdefault(path.parent.parent, {})[path.parent.name] = summary_tolerance(aggregates)
    for variant_dir, by_leaf in scores.items():
        paths, notes = update_summary(variant_dir, {leaf: (s, s) for leaf, s in by_leaf.items()},
                                      tolerance[variant_dir], create=create, dry_run=dry_run)
        written[f"{variant_dir.name} summary"] = [str(p) for p in paths]
        warnings += [note for leaf_notes in notes.values() for note in leaf_notes]
        if charts:
            written[f"{variant_dir.name} charts"] = [str(p) for p in ([] if dry_run else write_charts(variant_dir, by_leaf))]
    return written, sum(map(len, scores.values())), warnings, problems


def summary_tolerance(aggregates: dict) -> float:
    """How far a stored summary cell may be from what the aggregates give: the users computed it from
    unrounded aggregates, so 0.01 when the file's are rounded to two decimals, else 1e-6."""
    from .results import is_rounded

    return 0.01 if is_rounded(aggregates) else 1e-6
