"""The users' rule for Visualization answers: which code runs, how it runs, how its chart is read and compared.

Their fork (jetfan-xin/RealHiTBENCH-Qwen3-VL) scores every Visualization item in the inference scripts
(``inference/inference_qwen3vl_local_a100*.py``, Visualization branch and ``exec_and_get_y_reference``) with
``utils/chart_process.py`` (extraction, ``build_eval_code``, ``surround_pycode_with_main``) and
``utils/chart_metric_util.py`` (the getters and the comparison, after TableBench); their
``utils/recompute_visualization_metrics_enhanced.py`` recomputes with the same steps. Each function below
cites the step it reproduces. What their environment adds (numpy 1.x printing, matplotlib's version, time
on a slow node) is in docs/facts.md.

Self-contained on purpose: the sandbox imports this file by path inside its namespaces, where only the
Python runtime with matplotlib and numpy exists (no hpc_rerun package, no relative imports). The chart
reading functions import matplotlib inside them, so the checker outside imports this module cheaply.
"""

from __future__ import annotations

import ast
import io
import os
import re
import sys

CHART_TYPES = ("LineChart", "BarChart", "PieChart", "ScatterChart")  # the first word of a Visualization SubQType
_PANDAS_BLOCK = re.compile(r"import pandas as pd.*?plt\.show\(\)", re.DOTALL)
_PYPLOT_BLOCK = re.compile(r"import matplotlib.pyplot as plt.*?plt\.show\(\)", re.DOTALL)  # unescaped dots: theirs
_SINGLE_QUOTED_XLSX = re.compile(r"'[^']*\.xlsx'")
_DOUBLE_QUOTED_XLSX = re.compile(r'"[^"]*\.xlsx"')
_TABLE = "\0table\0"  # stands for the table's path while the answer is rewritten (no answer holds a NUL)
_printed: io.StringIO | None = None  # inside the sandbox: what the answer's code printed (see run_like_the_users)


def point_at_table(answer: str, table: str) -> str:
    """Every quoted ``'....xlsx'`` / ``"....xlsx"`` and every bare ``table.xlsx`` of the answer becomes the
    table's path, before the code is extracted (their inference scripts, Visualization branch: three
    ``re.sub``/``replace`` on the response; ``replace_table_path`` in the recompute script). So code that
    reads ``'data.xlsx'`` or ``'/path/to/file.xlsx'`` reads the task's table. (A stand-in first, so that a
    ``table`` path ending in table.xlsx is not replaced again: theirs, tables/<FileName>.xlsx, never is.)"""
    answer = _SINGLE_QUOTED_XLSX.sub(f"'{_TABLE}'", answer)
    answer = _DOUBLE_QUOTED_XLSX.sub(f'"{_TABLE}"', answer)
    return answer.replace("table.xlsx", _TABLE).replace(_TABLE, table)


def extract_plot_code(answer: str) -> str | None:
    """The last ``import pandas as pd ... plt.show()`` block, else the last ``import matplotlib.pyplot as plt
    ... plt.show()`` block, whole (chart_process.visualization_code_format); None where neither is found
    (theirs runs an empty block then, which fails: ECR false)."""
    for block in (_PANDAS_BLOCK, _PYPLOT_BLOCK):
        found = block.findall(answer)
        if found:
            return found[-1]
    return None


def benchmark_program(code: str) -> str:
    """The program their first run executes (chart_process.build_eval_code, then surround_pycode_with_main):
    every line stripped of its spaces at both ends, all indented by four under ``if __name__ ==
    '__main__':``. Flat code runs as written; the body of a ``for``/``if``/``with``/``def``/``try`` loses
    its indentation and the program fails to compile (ECR false in the stored results, where Python itself
    would run it)."""
    flat = "".join(line.strip(" ") + "\n" for line in code.strip().split("\n"))
    return "\nif __name__ == '__main__':\n" + "".join(f"    {line}\n" for line in flat.strip().split("\n"))


def sandbox_program(answer: str) -> str:
    """solution.py for the sandbox: the answer, run there as their scripts run it (``run_like_the_users``;
    the table's path is only known inside)."""
    return f"import charts\ncharts.run_like_the_users({answer!r})\n"


# Inside the sandbox -------------------------------------------------------------------------------------------

def _script_namespace() -> dict:
    """The module namespace their ``exec`` ran in: the inference script's, run as ``__main__``. Code that
    uses ``plt`` without importing it runs there; the other names are the script's standard imports."""
    import argparse
    import datetime
    import json
    import time

    import matplotlib.pyplot as plt

    return {"__name__": "__main__", "sys": sys, "os": os, "re": re, "ast": ast, "json": json, "time": time,
            "datetime": datetime, "argparse": argparse, "plt": plt}


def run_like_the_users(answer: str) -> None:
    """Run the answer's code as their first run does; it raises what the code raises (ECR false).

    Their ``execute(c)`` is ``exec(c)`` inside a function: the script's module namespace as globals, a
    separate dict as locals. Names the code assigns live in that dict, which a lambda, a comprehension or a
    function body cannot see: ``df.apply(lambda v: pd.to_numeric(v))`` or ``[df[c] for c in cols]`` raise
    NameError there (Python 3.10, theirs, as 3.11). What the code prints is kept: their second run reads
    stdout, the code's own prints included (``read_chart``)."""
    global _printed
    table = os.path.abspath("table.xlsx")  # where the sandbox puts the task's table
    program = benchmark_program(extract_plot_code(point_at_table(answer, table)) or "")
    _printed = sys.stdout = io.StringIO()
    exec(compile(program, "solution.py", "exec"), _script_namespace(), {})


def _line_values(ax) -> list:
    return [list(line.get_ydata()) for line in ax.get_lines()]


def _bar_values(ax) -> list:
    return [patch.get_height() for patch in ax.patches]


def _pie_values(ax) -> list:
    return [round((patch.theta2 - patch.theta1) / 360.0, 2) for patch in ax.patches]


def _scatter_values(ax) -> list:
    return [[offset[1] for offset in collection.get_offsets()] for collection in ax.collections]


_GETTERS = {"LineChart": _line_values, "BarChart": _bar_values, "PieChart": _pie_values,
            "ScatterChart": _scatter_values}  # chart_metric_util.get_{line,bar,pie,scatter}_y_predictions


def read_chart() -> dict:
    """What their second run prints, for every chart type: ``{"printed": the code's own output so far,
    "values": {type: the getter's list printed as numpy 1.x prints it, or None where the getter raises}}``.

    Each getter reads the current axes (``plt.gca()``) as chart_metric_util does: every line's y data, every
    patch's height, every patch's angles (a non-wedge patch in a pie's axes raises), every collection's y
    offsets. numpy 1.x printing: their runs had numpy < 2, where ``print([np.float64(3.0)])`` gives ``[3.0]``
    (numpy 2 prints ``np.float64(3.0)``, which no stored Pass true could have been parsed from)."""
    import matplotlib.pyplot as plt
    import numpy

    legacy = "1.25" if int(numpy.__version__.split(".")[0]) >= 2 else False
    ax = plt.gca()
    values: dict[str, str | None] = {}
    with numpy.printoptions(legacy=legacy):
        for chart, getter in _GETTERS.items():
            try:
                values[chart] = str(getter(ax))
            except Exception:  # their second run fails on any exception: the chart prints nothing
                values[chart] = None
    return {"printed": _printed.getvalue() if _printed is not None else "", "values": values}


def prepare_matplotlib() -> None:
    """matplotlib as the users' results were scored with it: Agg, and a pie whose sizes sum to zero drawn
    without an error (today's raises "All wedge sizes are zero"): the code ran, the chart holds no wedge."""
    import matplotlib

    matplotlib.use("Agg")
    import numpy
    from matplotlib.axes import Axes

    draw_pie = Axes.pie

    def pie_of_nothing_draws_nothing(self, x, *args, **kwargs):
        try:
            empty = float(numpy.sum(numpy.asarray(x, dtype=float))) == 0
        except (TypeError, ValueError):
            empty = False
        if empty:
            return ([], [], []) if kwargs.get("autopct") else ([], [])
        return draw_pie(self, x, *args, **kwargs)

    Axes.pie = pie_of_nothing_draws_nothing


# Outside: the comparison ----------------------------------------------------------------------------------------

def _one_level(values) -> list:
    """Nested lists opened one level, as their compute_*_chart_metric do (deeper lists stay and fail)."""
    flat = []
    for value in values:
        if isinstance(value, list):
            flat.extend(value)
        else:
            flat.append(value)
    return flat


def _same(expected: list, predicted: list) -> bool:
    """chart_metric_util.compare: sorted, same length, equal one by one."""
    expected.sort()
    predicted.sort()
    return len(expected) == len(predicted) and all(e == p for e, p in zip(expected, predicted))


def chart_matches(expected, predicted) -> bool:
    """compute_general_chart_metric: both sides opened one level, rounded to 2 places, compared sorted."""
    return _same([round(v, 2) for v in _one_level(expected)], [round(v, 2) for v in _one_level(predicted)])


def pie_chart_matches(expected, predicted) -> bool:
    """compute_pie_chart_metric: the reference divided by its sum and rounded to 2 places first (rounded
    shares need not sum to 1: 0.14, 0.57, 0.30 become 0.14, 0.56, 0.30); a zero sum raises."""
    flat = _one_level(expected)
    total = sum(flat)
    return _same([round(round(v / total, 2), 2) for v in flat], [round(v, 2) for v in _one_level(predicted)])


def chart_pass(sub_type: str | None, reference: str, reading: dict) -> bool | str:
    """Pass for code that ran, as their sequential loops store it: the comparison's True or False; 'False'
    (a string) when the printed values or the reference cannot be parsed or compared; 'None' when the second
    run printed nothing (the getter raised, or the SubQType names no type their checker reads). Their batch
    loops and the recompute script store False for both strings (``in_convention`` maps a file's items)."""
    chart = next(iter((sub_type or "").split()), "")  # their `SubQType.split()[0]`
    text = reading.get("values", {}).get(chart)
    if text is None:
        return "None"
    printed = (reading.get("printed", "") + text + "\n").strip()
    try:
        predicted, expected = ast.literal_eval(printed), ast.literal_eval(reference)
        return pie_chart_matches(expected, predicted) if chart == "PieChart" else chart_matches(expected, predicted)
    except Exception:  # theirs: `except Exception: Pass = 'False'`, whatever failed
        return "False"
