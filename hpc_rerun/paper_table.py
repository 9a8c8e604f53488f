"""The users' paper table ``results_table.tex`` at the results root, in the layout of their notebook
(``utils/result_visualization.ipynb``, ``generate_latex_table``): one row per input (Text in five formats from
``qwen3vl_text``, Image and Mix in five formats from ``qwen3vl_default_pic``), per question type F1/EM, Data
Analysis ROUGE-L/F1/EM, Visualization ECR/Pass as % of the type's items, 2 decimals, ``-`` where a value is
missing; lines joined by newlines, none at the end. Their notebook computed it from the items; the same
numbers come from each file's aggregates (``derived.aggregate_type_metrics``).

Like the variant summaries, the file is edited cell by cell: a cell keeps its text unless the operation
changed the value behind it (a merge), and one that disagrees with the aggregates is kept with a warning.
"""

from __future__ import annotations

from pathlib import Path

from .aggregates import TYPE_METRICS, TypeMetrics
from .atomic import atomic_write_bytes
from .derived import same_number

TABLE_NAME = "results_table.tex"
ROWS = {  # configuration -> the row's label, in the table's order
    "qwen3vl_text/text_latex": "Text (LaTeX)", "qwen3vl_text/text_html": "Text (HTML)",
    "qwen3vl_text/text_markdown": "Text (Markdown)", "qwen3vl_text/text_json": "Text (JSON)",
    "qwen3vl_text/text_csv": "Text (CSV)", "qwen3vl_default_pic/image": "Image",
    "qwen3vl_default_pic/mix_latex": "Mix (LaTeX)", "qwen3vl_default_pic/mix_html": "Mix (HTML)",
    "qwen3vl_default_pic/mix_markdown": "Mix (Markdown)", "qwen3vl_default_pic/mix_json": "Mix (JSON)",
    "qwen3vl_default_pic/mix_csv": "Mix (CSV)",
}
COLUMNS = [(question_type, metric) for question_type, metrics in TYPE_METRICS.items() for metric in metrics]
MODEL_CELL = r"\multirow{11}{*}{\textbf{Qwen3-VL}}"  # on the first row of the table only (their i == 0)
END_OF_ROW = r" \\"


def row_cells(metrics: TypeMetrics) -> list[str]:
    return [f"{metrics[t][m]:.2f}" if m in metrics.get(t, {}) else "-" for t, m in COLUMNS]


def row_line(config: str, cells: list[str]) -> str:
    model = MODEL_CELL if list(ROWS).index(config) == 0 else ""
    return f"{model} & {ROWS[config]} & " + " & ".join(cells) + END_OF_ROW


def render(metrics: dict[str, TypeMetrics]) -> str:
    """The whole table for these configurations (``variant/leaf`` -> metrics); rows without metrics left out."""
    lines = [r"\begin{table*}[t]", r"\centering",
             r"\caption{Performance of Qwen3-VL on RealHiTBench across different input modalities}",
             r"\label{tab:qwen3vl_results}", r"\resizebox{\textwidth}{!}{",
             r"\begin{tabular}{ll" + "c" * len(COLUMNS) + "}", r"\toprule",
             r"\textbf{Model} & \textbf{Input} & " + " & ".join(
                 rf"\multicolumn{{{len(ms)}}}{{c}}{{\textbf{{{t}}}}}" for t, ms in TYPE_METRICS.items()) + END_OF_ROW,
             " & & " + " & ".join(rf"\textbf{{{m}}}" for _, m in COLUMNS) + END_OF_ROW, r"\midrule"]
    lines += [row_line(config, row_cells(metrics[config])) for config in ROWS if config in metrics]
    lines += [r"\bottomrule", r"\end{tabular}", "}", r"\end{table*}"]
    return "\n".join(lines)


def split_row(line: str) -> tuple[str, list[str]] | None:
    """(the text up to the values, the values) of a data row of the table; None for any other line."""
    parts = line.rstrip().split(" & ")
    if len(parts) != 2 + len(COLUMNS) or parts[1] not in ROWS.values() or not parts[-1].endswith(END_OF_ROW):
        return None
    parts[-1] = parts[-1][:-len(END_OF_ROW)]
    return " & ".join(parts[:2]) + " & ", parts[2:]


def refresh_table(results_root: Path, changes: dict[str, tuple[TypeMetrics, TypeMetrics]], create: bool = False,
                  dry_run: bool = False) -> tuple[list[Path], list[str]]:
    """Bring ``<results_root>/results_table.tex`` up to date. ``changes``: configuration -> its metrics before,
    after (equal for ``report``). Without the file, it is made only with ``create``; a row it lacks is added
    only with ``create``. Returns (paths written, warnings)."""
    path = Path(results_root) / TABLE_NAME
    changes = {config: pair for config, pair in changes.items() if config in ROWS}
    if not path.exists():
        if not (create and changes):
            return [], []
        if not dry_run:
            atomic_write_bytes(path, render({config: after for config, (_, after) in changes.items()}).encode())
        return [path], []
    lines = path.read_text().split("\n")
    rows = {row[0].split(" & ")[1]: n for n, row in ((n, split_row(line)) for n, line in enumerate(lines)) if row}
    warnings, changed = [], False
    for config in sorted(changes, key=list(ROWS).index):
        before, after = (row_cells(m) for m in changes[config])
        if ROWS[config] not in rows:
            if create:
                following = [rows[ROWS[c]] for c in list(ROWS)[list(ROWS).index(config) + 1:] if ROWS[c] in rows]
                place = min(following) if following else max(rows.values(), default=len(lines) - 5) + 1
                lines.insert(place, row_line(config, after))
                rows = {label: n + (n >= place) for label, n in rows.items()} | {ROWS[config]: place}
                changed = True
            continue
        prefix, shown = split_row(lines[rows[ROWS[config]]])
        kept = []
        for (question_type, metric), text, was, now in zip(COLUMNS, shown, before, after):
            if was != now:  # the operation changed the value behind this cell
                kept.append(now)
                continue
            if not same_number(text, now):
                warnings.append(f"{path}: {ROWS[config]} {question_type} {metric} is {text} but the aggregates of "
                                f"{config} give {now}: kept (stale, or made by another rule)")
            kept.append(text)
        if kept != shown:
            line = lines[rows[ROWS[config]]]
            lines[rows[ROWS[config]]] = prefix + " & ".join(kept) + END_OF_ROW + line[len(line.rstrip()):]
            changed = True
    if not changed:
        return [], warnings
    if not dry_run:
        atomic_write_bytes(path, "\n".join(lines).encode())
    return [path], warnings
