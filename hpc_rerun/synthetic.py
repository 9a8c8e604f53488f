"""Result files in the users' three layouts with placeholder answers: what the demo's tree is made of (tests
and benchmarks build theirs with it too; their full-size trees are in tests/trees.py).

Items look like the real ones (same keys, same order); predictions are placeholders.
"""

from __future__ import annotations

from pathlib import Path

from .atomic import atomic_write_json
from .benchmark import Config, Task

ERROR_PREDICTIONS = {
    "oom_text": "[ERROR] OOM: Text too large (334159 tokens)",
    "oom_image": "[ERROR] OOM: Image too large ((7016, 4961))",
    "missing_input": "[ERROR] File not found: /data/RealHiTBench/image/x.png",
    "format_failure": "[ERROR] Failed to get proper final answer format",
    "other": "[ERROR] Failed after 3 retries: RuntimeError('device-side assert triggered')",
}


def make_item(task: Task, prediction: str, processing_time: float = 2.5) -> dict:
    if prediction.startswith("[ERROR]"):
        metrics = {"F1": 0.0, "EM": 0.0, "ROUGE-L": 0.0, "SacreBLEU": 0.0}
    elif task.question_type == "Visualization":
        metrics = {"ECR": True, "Pass": False}
    else:
        metrics = {"F1": 50.0, "EM": 0.0, "ROUGE-L": 50.0, "SacreBLEU": 10.0}
    return {
        "id": task.id,
        "FileName": task.file_name,
        "QuestionType": task.question_type,
        "SubQType": task.sub_type,
        "Question": task.question,
        "Reference": task.reference,
        "Prediction": prediction,
        "Metrics": metrics,
        "ProcessingTime": processing_time,
    }


def wrap_layout(layout: str, config: Config, items: list[dict]) -> dict:
    """A result file's top level in layout a, b or c (aggregates are placeholders here)."""
    run = {"model_dir": "/models/Qwen3-VL-8B-Instruct", "modality": config.modality, "format": config.format,
           "total_queries": len(items)}
    if layout == "a":
        return {"config": run, "aggregate_metrics": {"by_question_type": {}, "overall": {}}, "results": items}
    if layout == "b":
        return {"config": run, "aggregate_metrics": {}, "results": items}
    if layout == "c":
        return {"configs": [dict(run, source_identifier="shard_0")], "results": items}
    raise ValueError(f"unknown layout {layout!r}")


def write_result_file(path: Path, layout: str, config: Config, items: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, wrap_layout(layout, config, items))
    return path
