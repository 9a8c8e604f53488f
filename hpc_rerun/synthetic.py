"""Synthetic result trees in the users' three layouts, for tests, benchmarks and the demo.

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


def write_data_root(root: Path, tasks: dict[int, Task], missing: set[str] = frozenset()) -> Path:
    """Create every source file the tasks can need (empty files), except the relative paths in ``missing``."""
    from .benchmark import FORMATS, IMAGE_DIR, IMAGE_EXT, XLSX_DIR, XLSX_EXT

    folders = [(IMAGE_DIR, IMAGE_EXT), (XLSX_DIR, XLSX_EXT), *FORMATS.values()]
    names = {t.file_name for t in tasks.values()}
    for folder, ext in folders:
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            rel = f"{folder}/{name}{ext}"
            if rel not in missing:
                (root / rel).touch()
    return root


# The 15 configurations of the users' evaluation (5 text formats, image and 4 mixes per picture variant).
FULL_SIZE_CONFIGS = (
    [f"qwen3vl_text/text_{f}" for f in ("latex", "html", "csv", "markdown", "json")]
    + ["qwen3vl_default_pic/image"] + [f"qwen3vl_default_pic/mix_{f}" for f in ("latex", "html", "csv", "markdown")]
    + ["qwen3vl_resize_pic/image"] + [f"qwen3vl_resize_pic/mix_{f}" for f in ("html", "csv", "markdown", "json")]
)


def write_full_size_tree(root: Path, tasks: dict[int, Task], seed: int = 0) -> tuple[Path, Path]:
    """15 configurations x every task (~30 MB for the real 3071), ~0.3% absent and ~0.7% errors each,
    layouts a, b, c in turn; plus a data root. Returns (results root, data root)."""
    import random

    rng = random.Random(seed)
    words = "the total employment year sector rate growth value table column row answer".split()
    errors = list(ERROR_PREDICTIONS.values())
    for n, name in enumerate(FULL_SIZE_CONFIGS):
        items = []
        for task in tasks.values():
            roll = rng.random()
            if roll < 0.003:
                continue  # absent
            prediction = (rng.choice(errors) if roll < 0.01
                          else " ".join(rng.choice(words) for _ in range(rng.randint(3, 40))))
            items.append(make_item(task, prediction, processing_time=round(rng.uniform(0.5, 30), 2)))
        write_result_file(root / "tree" / name / "results.json", "abc"[n % 3], Config.parse(name), items)
    data_root = write_data_root(root / "data", tasks, {"html/labor-table68.html", "json/health-table09.json"})
    return root / "tree", data_root
