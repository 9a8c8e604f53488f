"""Per-item metrics exactly as the stored results have them, so merged items look like the originals.

F1 / EM / ROUGE-L / SacreBLEU on normalised answers (x100, 2 decimals); Visualization ECR / Pass by
running the extracted plotting code in the sandbox; Summary / Anomaly analysis keep the LLM-judge
placeholder the originals carry.
"""

from __future__ import annotations

import ast
import re
import string
from collections import Counter
from pathlib import Path

from ..benchmark import XLSX_DIR, XLSX_EXT, Task

GPT_EVAL_PLACEHOLDER = {"GPT_EVAL": "N/A (no eval_api_key)"}
JUDGED_SUBTYPES = {"Summary Analysis", "Anomaly Analysis"}
_DECIMAL = re.compile(r"\b\d+\.\d+\b")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)
_CODE = re.compile(r"import pandas as pd.*?plt\.show\(\)", re.DOTALL)


def normalise(text: str, empty: str = "#") -> str:
    """Decimals rounded to 1 place, lower case, no punctuation or articles, single spaces; nothing left ->
    ``empty`` ('#' for a prediction; a reference stays '', so an articles-only answer such as choice "A"
    scores 0 against reference "A", as the benchmark's stored metrics have it)."""
    text = _DECIMAL.sub(lambda m: str(round(float(m.group()), 1)), text)
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = " ".join(_ARTICLES.sub(" ", text).split())
    return text or empty


def _f1(reference: str, prediction: str) -> float:
    ref, pred = reference.split(), prediction.split()
    same = sum((Counter(ref) & Counter(pred)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def text_metrics(reference: str, prediction: str) -> dict[str, float]:
    import sacrebleu
    from rouge_score import rouge_scorer

    ref, pred = normalise(str(reference), empty=""), normalise(str(prediction))
    rouge = rouge_scorer.RougeScorer(["rougeL"]).score(ref, pred)["rougeL"].fmeasure
    return {
        "F1": round(_f1(ref, pred) * 100, 2),
        "EM": round(100.0 * (ref == pred), 2),
        "ROUGE-L": round(rouge * 100, 2),
        "SacreBLEU": round(sacrebleu.corpus_bleu([pred], [[ref]]).score, 2),
    }


def extract_plot_code(prediction: str) -> str | None:
    """The last ``import pandas as pd ... plt.show()`` block of an answer."""
    blocks = _CODE.findall(prediction)
    if not blocks:
        return None
    code = blocks[-1]
    last_start = code.rfind("import pandas as pd")
    return code[last_start:]


def _runnable(code: str) -> str:
    """The prompt's own answer format puts a space after each newline; undo that when it breaks parsing."""
    try:
        compile(code, "solution.py", "exec")
        return code
    except SyntaxError:
        return "\n".join(line[1:] if line.startswith(" ") else line for line in code.split("\n"))


CHART_TYPES = ("LineChart", "BarChart", "PieChart", "ScatterChart")  # the first word of a Visualization SubQType


def _flat(values) -> list[float]:
    flat: list[float] = []

    def walk(v):
        if isinstance(v, (list, tuple)):
            for x in v:
                walk(x)
        else:
            flat.append(float(v))

    walk(values)
    return flat


def chart_passes(chart: str | None, reference: list[float], plotted: list[float]) -> bool:
    """The benchmark's comparison: both sides rounded to 2 places, sorted, equal. A pie's reference shares are
    normalised by their sum first (rounded shares need not sum to 1: 0.14, 0.57, 0.30 become 0.14, 0.56, 0.30),
    so a chart whose shares round to the reference's can still fail, as the stored results have it."""
    if chart == "PieChart" and sum(reference):
        total = sum(reference)
        reference = [r / total for r in reference]
    return sorted(round(v, 2) for v in plotted) == sorted(round(r, 2) for r in reference)


def visualization_metrics(task: Task, prediction: str, data_root: Path) -> dict:
    from .sandbox import run_plot_code

    code = extract_plot_code(prediction)
    if code is None:
        return {"ECR": False, "Pass": "None"}
    xlsx = Path(data_root) / XLSX_DIR / f"{task.file_name}{XLSX_EXT}"
    run = run_plot_code(_runnable(code), xlsx if xlsx.exists() else None, task.file_name)
    if not run.ok:
        return {"ECR": False, "Pass": "None"}
    try:
        reference = _flat(ast.literal_eval(str(task.reference).strip()))
    except (ValueError, SyntaxError, TypeError):
        return {"ECR": True, "Pass": False}
    chart = (task.sub_type or "").split(" ")[0]
    if chart in CHART_TYPES and run.by_chart is not None:
        return {"ECR": True, "Pass": chart_passes(chart, reference, run.by_chart.get(chart, []))}
    return {"ECR": True, "Pass": chart_passes(None, reference, run.y_values)}


def not_run_pass(items: list[dict]) -> object:
    """What a file stores as ``Pass`` for Visualization code that did not run (ECR false): the benchmark
    writes 'None', some of the users' files False. The file's own most common value; 'None' without one."""
    seen = [i["Metrics"].get("Pass") for i in items if isinstance(i.get("Metrics"), dict)
            and i["Metrics"].get("ECR") is False]
    return False if sum(v is False for v in seen) > sum(v == "None" for v in seen) else "None"


def in_convention(metrics: dict, not_run: object) -> dict:
    """``metrics`` with the file's ``Pass`` for code that did not run."""
    if isinstance(metrics, dict) and metrics.get("ECR") is False and "Pass" in metrics:
        return dict(metrics, Pass=not_run)
    return metrics


def score(task: Task, prediction: str, data_root: Path) -> dict:
    """The ``Metrics`` object for one answered task."""
    if task.question_type == "Visualization":
        return visualization_metrics(task, prediction, data_root)
    if task.sub_type in JUDGED_SUBTYPES:
        return dict(GPT_EVAL_PLACEHOLDER)
    return text_metrics(task.reference, prediction)
