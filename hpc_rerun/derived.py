"""The tables users derive from a result file's ``aggregate_metrics``, in their own shapes.

Beside each result file the users keep ``aggregate_metrics.csv`` and ``aggregate_metrics.md``, written by
their ``utils/visualize_aggregate_metrics.py``: one row per question type in the file's order, then
``Overall`` where the file has an overall level; columns EM, F1, ROUGE-L, SacreBLEU, Pass, ECR, then the
others sorted (ProcessingTime); an ECR/Pass column stored as fractions shown as percentages. The CSV has 6
decimals; the Markdown holds every value as 2-decimal text, which their tabulate kept as text in columns
with an empty cell and read back as numbers (general format: ``8.30`` shows as ``8.3``) in full ones.
Per variant, ``modality_summary.csv`` holds the score per question type of their notebook; the paper table
lives in ``paper_table.py``. A file is rewritten only when a value it shows changed: ``report`` leaves
current files byte for byte, whatever their number format or row order.
"""

from __future__ import annotations

import csv
import io
import textwrap
from pathlib import Path

from .aggregates import (
    DEFAULT_TYPE_METRICS,
    QUESTION_TYPES,
    TYPE_METRICS,
    Level,
    TypeMetrics,
    is_rounded,
    items_by_type,
    overall_score,
)
from .atomic import atomic_write_bytes

CSV_NAME, MARKDOWN_NAME = "aggregate_metrics.csv", "aggregate_metrics.md"
SUMMARY_NAME = "modality_summary.csv"  # per variant: configurations x question types, then Overall
SUMMARY_FORMATS = ["image", "latex", "html", "markdown", "json", "csv"]  # where a new configuration's row goes
FIRST_COLUMNS = ["EM", "F1", "ROUGE-L", "SacreBLEU", "Pass", "ECR"]
SHARES = ("Pass", "ECR")


def aggregate_frame(aggregates: dict):
    """The users' DataFrame: question types (then Overall) by metric, numbers only."""
    import pandas as pd

    nested = "by_question_type" in aggregates
    rows = dict(aggregates["by_question_type"]) if nested else dict(aggregates)
    if nested and aggregates.get("overall"):
        rows["Overall"] = aggregates["overall"]
    rows = {k: v for k, v in rows.items() if isinstance(v, dict)}
    frame = pd.DataFrame(rows).T.apply(pd.to_numeric, errors="coerce")
    for share in [c for c in SHARES if c in frame.columns]:
        if frame[share].max() <= 1.0:  # NaN compares False: an empty column stays as it is
            frame[share] = frame[share] * 100.0
    first = [c for c in FIRST_COLUMNS if c in frame.columns]
    return frame[first + sorted(c for c in frame.columns if c not in first)]


def aggregate_tables(aggregates: dict) -> dict[str, bytes]:
    """{file name: content} of ``aggregate_metrics.csv`` and ``.md`` as the users' script writes them."""
    import pandas as pd

    frame = aggregate_frame(aggregates)
    markdown = frame.copy()
    for column in markdown.columns:
        markdown[column] = markdown[column].map(lambda v: "" if pd.isna(v) else f"{v:.2f}")
    with_gaps = [n + 1 for n, c in enumerate(frame.columns) if frame[c].isna().any()]  # + 1: the index column
    return {CSV_NAME: frame.to_csv(float_format="%.6f").encode(),
            MARKDOWN_NAME: markdown.to_markdown(disable_numparse=with_gaps).encode()}


def shown_cells(name: str, content: str) -> dict[tuple[str, str], str] | None:
    """(row, column) -> the text of each cell a derived table shows; None when it is not such a table."""
    if name == CSV_NAME:
        rows = list(csv.reader(io.StringIO(content)))
    else:
        rows = [[c.strip() for c in line.strip().strip("|").split("|")]
                for line in content.splitlines() if line.strip()]
        del rows[1:2]  # the alignment line
    if not rows or any(len(row) != len(rows[0]) for row in rows):
        return None
    return {(row[0], column): cell for row in rows[1:] for column, cell in zip(rows[0][1:], row[1:])}


def same_number(shown: str, made: str) -> bool:
    """A cell shows the value we would write: equal, or written with more decimals that round to it (``8.30``
    against ``8.3``, ``6.698932`` against ``6.70``)."""
    if not shown or not made:
        return shown == made
    try:
        decimals = len(made.split(".")[1]) if "." in made else 0
        return abs(round(float(shown), decimals) - float(made)) < 1e-9
    except ValueError:
        return False


def shows_same_values(name: str, existing: bytes, made: bytes) -> bool:
    """Every cell the existing table and ours both have agrees, whatever its number format or row order.
    Rows or columns only one of them has are the file's own choice, not a change."""
    try:
        old, new = shown_cells(name, existing.decode()), shown_cells(name, made.decode())
    except UnicodeDecodeError:
        return False
    return old is not None and new is not None and all(same_number(old[k], new[k]) for k in old.keys() & new.keys())


def refresh(result_path: Path, aggregates: dict, create: bool = False, dry_run: bool = False) -> list[Path]:
    """Rewrite the derived tables beside ``result_path`` (made with ``create`` where there are none) whose
    values differ from what ``aggregates`` give; returns the files written (or, with ``dry_run``, that
    would be)."""
    written = []
    for name, content in aggregate_tables(aggregates).items():
        path = Path(result_path).parent / name
        if path.exists():
            existing = path.read_bytes()
            if existing == content or shows_same_values(name, existing, content):
                continue
        elif not create:
            continue
        if not dry_run:
            atomic_write_bytes(path, content)
        written.append(path)
    return written


def aggregate_type_metrics(aggregates: dict, items: list[dict] | None = None) -> TypeMetrics:
    """The users' metrics per question type from a file's stored aggregates, in the users' order (shares as
    percentages; a Pass the file counts over ECR-true items, as found from ``items``, made a share of all
    the type's items, as their notebook counts it)."""
    frame = aggregate_frame(aggregates)
    stored = aggregates.get("by_question_type", aggregates)
    rule = Level("types", stored, items_by_type(items), is_rounded(aggregates)).rule if items else None
    values = {}
    for question_type in [t for t in QUESTION_TYPES if t in frame.index] + [t for t in frame.index if t not in
                                                                             QUESTION_TYPES + ["Overall"]]:
        row = frame.loc[question_type]
        got = {m: float(row[m]) for m in TYPE_METRICS.get(question_type, DEFAULT_TYPE_METRICS)
               if m in row and row[m] == row[m]}  # missing or NaN: left out
        if rule is not None and rule.pass_over_ran and "Pass" in got and "ECR" in got:
            got["Pass"] = got["Pass"] * got["ECR"] / 100
        if got:
            values[str(question_type)] = got
    return TypeMetrics(values)


def aggregate_type_scores(aggregates: dict, items: list[dict] | None = None) -> dict[str, float]:
    """The users' score per question type from a file's stored aggregates (see ``aggregate_type_metrics``)."""
    return aggregate_type_metrics(aggregates, items).scores()


def summary_order(leaf: str) -> tuple:
    fmt = leaf.split("_", 1)[1] if "_" in leaf else leaf
    return (SUMMARY_FORMATS.index(fmt) if fmt in SUMMARY_FORMATS else len(SUMMARY_FORMATS), leaf)


def csv_row(line: str) -> list[str]:
    return next(csv.reader([line]), [])


def cell_value(text: str) -> float:
    """A summary cell's number; NaN for an empty or unreadable one (it then disagrees, and is reported)."""
    try:
        return float(text)
    except ValueError:
        return float("nan")


def update_summary(variant_dir: Path, changes: dict[str, tuple[TypeMetrics, TypeMetrics]],
                   tolerance: dict[str, float], create: bool = False, dry_run: bool = False
                   ) -> tuple[list[Path], dict[str, list[str]]]:
    """Bring ``<variant>/modality_summary.csv`` up to date. ``changes``: configuration leaf -> its metrics
    before, after (equal for ``report``, which changes nothing). Edited line by line, so every other line
    keeps its bytes. A cell whose score the operation did not change keeps its text; where it disagrees
    with the aggregates by more than the leaf's ``tolerance`` (1e-6, or 0.01 from rounded aggregates) it is
    kept with a warning: stale, or made by a rule the items cannot show. Changed cells are rewritten and the
    row's Overall with them. A configuration without a row gets one only with ``create`` (the users choose
    which configurations their summary shows). Returns (paths written, leaf -> warnings)."""
    path = variant_dir / SUMMARY_NAME
    if not path.exists():
        return (new_summary(path, changes, dry_run), {}) if create else ([], {})
    lines = path.read_text().splitlines(keepends=True)
    columns = csv_row(lines[0])[1:] if lines else []
    warnings: dict[str, list[str]] = {}
    changed = False
    for leaf, (before_metrics, after_metrics) in changes.items():
        before, after = before_metrics.scores(), after_metrics.scores()
        row_at = next((n for n, line in enumerate(lines[1:], 1) if csv_row(line)[:1] == [leaf]), None)
        if row_at is None:
            if create:
                after_row = {**after, "Overall": overall_score(after)}
                cells = ["" if after_row.get(c) is None else repr(after_row[c]) for c in columns]
                place = next((n for n, line in enumerate(lines[1:], 1)
                              if summary_order(csv_row(line)[0]) > summary_order(leaf)), len(lines))
                ending = lines[0][len(lines[0].rstrip("\r\n")):] or "\n"
                if place == len(lines) and not lines[-1].endswith("\n"):
                    lines[-1] += ending
                lines.insert(place, ",".join([leaf, *cells]) + ending)
                changed = True
            continue
        cells = dict(zip(columns, csv_row(lines[row_at])[1:]))
        touched = [t for t, value in after.items() if before.get(t) != value and t in cells]
        for question_type, value in after.items():
            if question_type not in cells:
                warnings.setdefault(leaf, []).append(f"{path}: no {question_type} column; {leaf}'s score "
                                                     f"{value} not written")
            elif question_type in touched:
                cells[question_type] = repr(float(value))
            elif not abs(cell_value(cells[question_type]) - value) <= tolerance.get(leaf, 1e-6):
                warnings.setdefault(leaf, []).append(
                    f"{path}: {leaf} {question_type} is {cells[question_type]} but its aggregate_metrics give "
                    f"{value}: kept (stale, or made by another rule)")
        if touched:
            if "Overall" in cells:
                cells["Overall"] = repr(overall_score({t: cell_value(cells[t]) for t in columns
                                                       if t != "Overall" and cells.get(t)}))
            ending = lines[row_at][len(lines[row_at].rstrip("\r\n")):]
            lines[row_at] = ",".join([leaf, *(cells.get(c, "") for c in columns)]) + ending
            changed = True
    if not changed:
        return [], warnings
    if not dry_run:
        atomic_write_bytes(path, "".join(lines).encode())
    return [path], warnings


def new_summary(path: Path, changes: dict[str, tuple[TypeMetrics, TypeMetrics]], dry_run: bool) -> list[Path]:
    """A variant's summary as the users' notebook writes it: its configurations in format order, the five
    question types, then Overall."""
    import pandas as pd

    scores = {leaf: after.scores() for leaf, (_, after) in changes.items()}
    types = [t for t in QUESTION_TYPES if any(t in s for s in scores.values())]
    types += sorted({t for s in scores.values() for t in s} - set(types))
    frame = pd.DataFrame({leaf: {**{t: s.get(t) for t in types}, "Overall": overall_score(s)}
                          for leaf, s in sorted(scores.items(), key=lambda kv: summary_order(kv[0])) if s}).T
    if not dry_run:
        atomic_write_bytes(path, frame[[*types, "Overall"]].to_csv().encode())
    return [path]


def merge_figure(rows: list[dict]):
    """Per variant a heat map of its configurations x question types: each cell the score before -> after
    and the change, coloured by the change on one scale shared by every panel (red down, blue up)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    by_variant: dict[str, dict[str, dict[str, dict]]] = {}
    for row in rows:
        variant, _, leaf = row["config"].rpartition("/")
        by_variant.setdefault(variant, {}).setdefault(leaf, {})[row["question_type"]] = row
    present = {row["question_type"] for row in rows}
    types = [t for t in QUESTION_TYPES if t in present] + sorted(present - set(QUESTION_TYPES))
    changes = [row["after"] - row["before"] for row in rows if row["before"] is not None and row["after"] is not None]
    limit = max([abs(c) for c in changes] + [1.0])  # at least +-1, so a 0.01 change stays pale
    norm, cmap = TwoSlopeNorm(vcenter=0, vmin=-limit, vmax=limit), plt.get_cmap("RdBu")
    heights = [len(leaves) for leaves in by_variant.values()]
    figure, axes = plt.subplots(len(by_variant), 1, squeeze=False, layout="constrained",
                                figsize=(2.1 * len(types) + 2.2, 0.6 * sum(heights) + 1.0 * len(heights) + 1.7),
                                gridspec_kw={"height_ratios": heights})
    for axis, (variant, leaves) in zip(axes[:, 0], by_variant.items()):
        names = sorted(leaves, key=summary_order)
        grid = np.full((len(names), len(types)), np.nan)
        for (r, leaf), (c, question_type) in ((a, b) for a in enumerate(names) for b in enumerate(types)):
            row = leaves[leaf].get(question_type)
            if row is None:
                axis.text(c, r, "-", ha="center", va="center", color="grey")
                continue
            before, after, ids = row["before"], row["after"], row["changed"]
            if before is not None and after is not None:
                grid[r, c] = after - before
                if not ids and before == after:  # untouched: the score alone, quiet
                    axis.text(c, r, f"{after:.2f}", ha="center", va="center", fontsize=8.5, color="dimgrey")
                    continue
            label = f"{'-' if before is None else f'{before:.2f}'} → {'-' if after is None else f'{after:.2f}'}"
            if grid[r, c] == grid[r, c]:
                label += "\n±0.00" if abs(grid[r, c]) < 0.005 else f"\n{grid[r, c]:+.2f}"
            if ids:
                label += f"  ({len(ids)} item{'s' if len(ids) > 1 else ''})"
            strong = grid[r, c] == grid[r, c] and abs(grid[r, c]) > 0.6 * limit
            axis.text(c, r, label, ha="center", va="center", fontsize=8.5, color="white" if strong else "black")
        axis.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, aspect="auto")
        axis.set_facecolor("#f2f2f2")
        axis.set_xticks(range(len(types)), [textwrap.fill(t, 14) for t in types], fontsize=9)
        axis.xaxis.tick_top()
        axis.set_yticks(range(len(names)), names, fontsize=9)
        axis.set_title(variant or "results", loc="left", fontweight="bold", fontsize=10)
    figure.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes[:, 0].tolist(), location="bottom",
                    shrink=0.5, aspect=40, label="change of the score (after - before)")
    figure.suptitle("Merge: score per question type, before → after", fontsize=11)
    return figure


def write_merge_report(stem: Path, rows: list[dict]) -> list[Path]:
    """``<stem>.md`` and ``<stem>.png`` (rundir.py: ``merge-report`` in the run directory): per configuration
    and question type the score before and after a merge, and the items it changed. ``rows``: config,
    question_type, before, after, changed (ids). The chart stays readable at any number of configurations:
    a heat map per variant, one line per configuration."""
    import matplotlib.pyplot as plt
    import pandas as pd

    frame = pd.DataFrame(rows, columns=["config", "question_type", "before", "after", "changed"])
    frame["change"] = frame["after"] - frame["before"]
    lines = ["# Merge: scores before and after", "",
             ("Score per question type as the users' modality summary counts it: mean of EM and F1 (Data "
              "Analysis: EM, F1, ROUGE-L; Visualization: ECR and Pass, % of the type's items)."), ""]
    table = frame.assign(changed=frame["changed"].map(lambda ids: ", ".join(map(str, ids)) or "-"))
    lines.append(table.to_markdown(index=False, floatfmt=".2f"))
    markdown = stem.with_suffix(".md")
    atomic_write_bytes(markdown, ("\n".join(lines) + "\n").encode())
    chart = stem.with_suffix(".png")
    figure = merge_figure(rows)
    figure.savefig(chart, dpi=110)
    plt.close(figure)
    return [markdown, chart]


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
        if not np.isnan(value):
            axis.text(column, row, f"{value:.2f}", ha="center", va="center",
                      color="white" if value > 60 else "black")
    figure.colorbar(image, ax=axis, label="score")
    axis.set_title(f"{variant_dir.name}: score by configuration and question type")
    figure.tight_layout()
    path = variant_dir / "scores_heatmap.png"
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return written + [path]


def summary_tolerance(aggregates: dict) -> float:
    """How far a stored summary cell may be from what the aggregates give: the users computed it from
    unrounded aggregates, so 0.01 when the file's are rounded to two decimals, else 1e-6."""
    return 0.01 if is_rounded(aggregates) else 1e-6
