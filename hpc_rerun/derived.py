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
    from .results import ShareRule, _by_type, _means

    scores = {}
    for question_type, group in _by_type(items).items():
        means = _means(group, ShareRule(100.0, False), with_time=False)
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
    from .results import Level, _by_type, _is_rounded

    frame = aggregate_frame(aggregates)
    stored = aggregates.get("by_question_type", aggregates)
    rule = Level("types", stored, _by_type(items), _is_rounded(aggregates)).rule if items else None
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


def write_charts(variant_dir: Path, scores: dict[str, dict[str, float]]) -> list[Path]:
    """Per configuration ``<leaf>/<leaf>_scores.png`` (a bar per question type) and per variant
    ``scores_heatmap.png`` (configurations x question types), each number written on the chart.
    ``scores``: configuration leaf -> question type -> score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written = []
    for leaf, by_type in scores.items():
        figure, axis = plt.subplots(figsize=(9, 4.5))
        labels = [textwrap.fill(t, 14) for t in by_type]
        bars = axis.bar(labels, list(by_type.values()), color="#4a78a8", edgecolor="black")
        axis.bar_label(bars, labels=[f"{v:.2f}" for v in by_type.values()], fontweight="bold")
        axis.set_title(f"{leaf.upper()} - score by question type", fontweight="bold")
        axis.set_ylabel("Average Score")
        axis.set_ylim(0, max([*by_type.values(), 1]) * 1.2)
        figure.tight_layout()
        path = variant_dir / leaf / f"{leaf}_scores.png"
        figure.savefig(path, dpi=120)
        plt.close(figure)
        written.append(path)
    present = {t for by_type in scores.values() for t in by_type}
    types = [t for t in QUESTION_TYPES if t in present] + sorted(present - set(QUESTION_TYPES))
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
               dry_run: bool = False) -> tuple[dict[str, list[str]], int, list[str]]:
    """The ``report`` step over a results tree: each configuration's tables refreshed from its stored
    aggregate_metrics (``create``: also where there are none), and with ``charts`` the charts of each
    variant. Returns ({configuration or "<variant> charts": paths written}, configurations checked,
    problems: unreadable result files)."""
    from .results import ResultFileError, load_result_file
    from .scan import discover_configs

    files, problems = discover_configs(results_root)
    written, scores = {}, {}
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
    if charts:
        for variant_dir, by_leaf in scores.items():
            paths = [] if dry_run else write_charts(variant_dir, by_leaf)
            written[f"{variant_dir.name} charts"] = [str(p) for p in paths]
    return written, sum(map(len, scores.values())), problems
