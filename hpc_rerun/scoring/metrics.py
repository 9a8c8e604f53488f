"""Per-item metrics exactly as the stored results have them, so merged items look like the originals.

F1 / EM / ROUGE-L / SacreBLEU on normalised answers (x100, 2 decimals); Visualization ECR / Pass by
running the extracted plotting code in the sandbox; Summary / Anomaly analysis keep the LLM-judge
placeholder the originals carry.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..benchmark import XLSX_DIR, XLSX_EXT, Task
from .charts import chart_pass, extract_plot_code, sandbox_program

GPT_EVAL_PLACEHOLDER = {"GPT_EVAL": "N/A (no eval_api_key)"}
JUDGED_SUBTYPES = {"Summary Analysis", "Anomaly Analysis"}
_DECIMAL = re.compile(r"\b\d+\.\d+\b")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


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


@dataclass(frozen=True)
class Scored:
    """One answer's ``Metrics`` (the benchmark's shape, as stored) and how they came about, for the caller to
    record beside the item: the sandbox layer its code ran under, and why it scored ECR false when the
    reason is the run's or the checker's (time, memory, a malformed result) rather than nothing to run."""
    metrics: dict
    sandbox_layer: str | None = None
    note: str | None = None


def visualization_metrics(task: Task, prediction: str, data_root: Path) -> Scored:
    """ECR / Pass of an answer's plotting code, run in the sandbox; whatever the code or its result does, an
    ECR false with the reason, never an exception (only a sandbox that cannot start raises)."""
    from .sandbox import run_plot_code

    if extract_plot_code(prediction) is None:
        return Scored({"ECR": False, "Pass": "None"}, note="no plotting code in the answer")
    xlsx = Path(data_root) / XLSX_DIR / f"{task.file_name}{XLSX_EXT}"
    run = run_plot_code(sandbox_program(prediction), xlsx if xlsx.exists() else None,
                        task.file_name)
    if not run.ok:
        return Scored({"ECR": False, "Pass": "None"}, run.layer, run.error)
    try:
        passed = chart_pass(task.sub_type, str(task.reference), run.reading)
    except Exception as err:  # a reading the comparison cannot take: the code wrote it, so the run's failure
        return Scored({"ECR": False, "Pass": "None"}, run.layer, f"checker: {type(err).__name__}: {err}"[:300])
    return Scored({"ECR": True, "Pass": passed}, run.layer)


def not_run_pass(items: list[dict]) -> object:
    """What a file stores as ``Pass`` for Visualization code that did not run (ECR false): the users'
    sequential loops write 'None', their batch loops and recompute script False. The file's own most common
    value; 'None' without one."""
    seen = [i["Metrics"].get("Pass") for i in items if isinstance(i.get("Metrics"), dict)
            and i["Metrics"].get("ECR") is False]
    return False if sum(v is False for v in seen) > sum(v == "None" for v in seen) else "None"


def in_convention(metrics: dict, not_run: object) -> dict:
    """``metrics`` in the file's convention: ``score`` gives Pass as the users' sequential loops store it
    ('None' when nothing was compared, 'False' when it could not be); a file whose not-run items store False
    came from their batch loops or recompute script, which store False for both."""
    if isinstance(metrics, dict) and not_run is False and metrics.get("Pass") in ("None", "False"):
        return dict(metrics, Pass=False)
    return metrics


def score_answer(task: Task, prediction: str, data_root: Path) -> Scored:
    """One answered task's ``Metrics``, with the sandbox layer and the reason where code did not run."""
    if task.question_type == "Visualization":
        return visualization_metrics(task, prediction, data_root)
    if task.sub_type in JUDGED_SUBTYPES:
        return Scored(dict(GPT_EVAL_PLACEHOLDER))
    return Scored(text_metrics(task.reference, prediction))


def score(task: Task, prediction: str, data_root: Path) -> dict:
    """The ``Metrics`` object for one answered task."""
    return score_answer(task, prediction, data_root).metrics
