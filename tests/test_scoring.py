"""Scoring reproduces the stored metrics (the sandbox itself: test_sandbox.py, test_sandbox_hostile.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hpc_rerun.benchmark import load_tasks
from hpc_rerun.scoring.metrics import normalise, score

from .conftest import MINI_DATA

MINI = Path(__file__).parent / "fixtures" / "realhitbench-mini"


def stored_items():
    for path in sorted((MINI / "results").rglob("results*.json")):
        for item in json.loads(path.read_text())["results"]:
            if not item["Prediction"].startswith("[ERROR]"):
                yield path.parent.name, item


def test_scoring_reproduces_every_stored_metric():
    """All real answered items of the mini results (text metrics, ECR/Pass, GPT_EVAL placeholder)."""
    tasks = load_tasks(MINI / "QA_final_sc_filled.json")
    checked = {"text": 0, "Visualization": 0, "judge": 0}
    for config, item in stored_items():
        ours = score(tasks[item["id"]], item["Prediction"], MINI_DATA)
        assert ours == item["Metrics"], (config, item["id"])
        kind = "Visualization" if "ECR" in ours else "judge" if "GPT_EVAL" in ours else "text"
        checked[kind] += 1
    assert checked["text"] > 100 and checked["Visualization"] == 10 and checked["judge"] > 10


def test_normalisation():
    assert normalise("The Total is 3.14159, an  estimate!") == "total is 31 estimate"
    assert normalise("  ") == "#"


def test_an_articles_only_answer_scores_zero_as_the_stored_metrics_have_it():
    """Choice "A" against reference "A": normalisation removes the article, the prediction becomes '#' and
    the reference stays empty, so the benchmark stores F1, EM and ROUGE-L 0 (31 such items in the users'
    tree); "B" against "B" scores 100."""
    from hpc_rerun.scoring.metrics import text_metrics

    assert text_metrics("A", "A") == {"F1": 0.0, "EM": 0.0, "ROUGE-L": 0.0, "SacreBLEU": 0.0}
    assert text_metrics("the", "A")["EM"] == 0.0
    assert text_metrics("B", "B")["F1"] == text_metrics("B", "B")["EM"] == 100.0


def chart_task(sub_type: str, reference: str):
    from hpc_rerun.benchmark import Task

    return Task(id=1, file_name="none-table01", question_type="Visualization", sub_type=sub_type,
                question="Draw it.", reference=reference)


def plot_answer(body: str) -> str:
    return f"[Final Answer]: import pandas as pd\nimport matplotlib.pyplot as plt\n{body}\nplt.show()"


@pytest.mark.parametrize("sub_type, reference, body, metrics", [
    # Shares that round to the reference but not to the reference normalised by its sum (1.01): the stored
    # results fail it, as the benchmark normalises a pie's reference first.
    ("PieChart Generation", "[0.14, 0.57, 0.3]", "plt.pie([0.136, 0.566, 0.298])", {"ECR": True, "Pass": False}),
    ("PieChart Generation", "[0.14, 0.57, 0.3]", "plt.pie([14, 56, 30])", {"ECR": True, "Pass": True}),
    # A pie whose sizes sum to zero: the users' matplotlib drew it without an error (stored ECR true).
    ("PieChart Generation", "[0.5, 0.5]", "plt.pie([0, 0])", {"ECR": True, "Pass": False}),
    # A bar chart is read by its bars: a mean line drawn over it is not a value of the chart.
    ("BarChart Generation", "[3, 1]", "plt.bar(['a', 'b'], [3, 1])\nplt.axhline(2)", {"ECR": True, "Pass": True}),
    ("LineChart Generation", "[[1, 2, 3]]", "plt.plot([3, 2, 1])", {"ECR": True, "Pass": True}),  # sorted, as theirs
    ("ScatterChart Generation", "[[5, 7]]", "plt.scatter([1, 2], [5, 7.004])", {"ECR": True, "Pass": True}),
])
def test_charts_are_compared_by_the_benchmarks_rule(sub_type, reference, body, metrics):
    assert score(chart_task(sub_type, reference), plot_answer(body), MINI_DATA) == metrics
