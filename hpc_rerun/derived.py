"""The tables users derive from a result file's ``aggregate_metrics``, in their own shapes.

Beside each result file the users keep ``aggregate_metrics.csv`` (pandas, every number with 6 decimals) and
``aggregate_metrics.md`` (a pandas/tabulate Markdown table, metrics as 2-decimal text, ProcessingTime as a
number): one row per question type in the file's order, then ``Overall`` where the file has an overall
level; columns EM, F1, ROUGE-L, SacreBLEU, Pass, ECR, then any others (ProcessingTime). ECR/Pass stored as
fractions are shown as percentages. A merge that changes the aggregates leaves these stale; ``refresh``
rewrites the ones that exist (atomically), ``report`` also those asked for.
"""

from __future__ import annotations

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
