"""RealHiTBench facts: the task list, configurations, the source files a task needs, error classes."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

# format -> (folder under the data root, file extension)
FORMATS = {
    "latex": ("latex", ".txt"),
    "html": ("html", ".html"),
    "csv": ("csv", ".csv"),
    "markdown": ("markdown", ".md"),
    "json": ("json", ".json"),
}
IMAGE_DIR, IMAGE_EXT = "image", ".png"
XLSX_DIR, XLSX_EXT = "tables", ".xlsx"
DEFAULT_TASK_LIST = "QA_final_sc_filled.json"


class BenchmarkError(ValueError):
    """Input that does not follow the benchmark's format; the message names the file and the fix."""


@dataclass(frozen=True)
class Task:
    id: int
    file_name: str
    question_type: str
    sub_type: str | None
    question: str
    reference: str


@dataclass(frozen=True)
class Variant:
    """How a configuration's model was run; a rerun must use the same settings."""

    name: str
    min_pixels: int | None = None
    max_pixels: int | None = None


# Built-in variants our users ran (qwen3vl_default_pic uses the processor's own limits).
DEFAULT_VARIANTS = {
    "qwen3vl_text": Variant("qwen3vl_text"),
    "qwen3vl_default_pic": Variant("qwen3vl_default_pic"),
    "qwen3vl_resize_pic": Variant("qwen3vl_resize_pic", min_pixels=256 * 28 * 28, max_pixels=2048 * 28 * 28),
}


@dataclass(frozen=True)
class Config:
    """One evaluated configuration, ``<variant>/<modality>[_<format>]``."""

    variant: str
    modality: str
    format: str | None

    @property
    def name(self) -> str:
        leaf = self.modality if self.format is None else f"{self.modality}_{self.format}"
        return f"{self.variant}/{leaf}"

    @classmethod
    def parse(cls, name: str) -> "Config":
        variant, sep, leaf = name.strip("/").rpartition("/")
        config = cls.from_parts(variant, leaf) if sep else None
        if config is None:
            raise BenchmarkError(
                f"'{name}' is not a configuration name; expected <variant>/<modality>[_<format>] "
                f"such as qwen3vl_text/text_html or qwen3vl_resize_pic/image"
            )
        return config

    @classmethod
    def from_parts(cls, variant: str, leaf: str) -> "Config | None":
        """The configuration a compiled-tree folder pair names, or None for any other folder."""
        modality, _, fmt = leaf.partition("_")
        if modality == "image" and not fmt:
            return cls(variant, "image", None)
        if modality in ("text", "mix") and fmt in FORMATS:
            return cls(variant, modality, fmt)
        return None


def load_tasks(path: str | Path) -> dict[int, Task]:
    """Read ``{"queries": [...]}``; every item needs a unique int ``id`` and a ``FileName``."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise BenchmarkError(f"{path}: task list not found; pass --tasks PATH (e.g. {DEFAULT_TASK_LIST})") from None
    except json.JSONDecodeError as err:
        raise BenchmarkError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("queries"), list):
        raise BenchmarkError(f'{path}: a task list must be {{"queries": [...]}} (QA_final_sc_filled.json)')
    tasks: dict[int, Task] = {}
    for pos, item in enumerate(data["queries"]):
        where = f"{path}: queries[{pos}]"
        if not isinstance(item, dict) or not isinstance(item.get("id"), int) or isinstance(item.get("id"), bool):
            raise BenchmarkError(f"{where} has no integer 'id'")
        if item["id"] in tasks:
            raise BenchmarkError(f"{where}: id {item['id']} appears twice")
        if not isinstance(item.get("FileName"), str):
            raise BenchmarkError(f"{where} (id {item['id']}) has no 'FileName'")
        tasks[item["id"]] = Task(
            id=item["id"],
            file_name=item["FileName"],
            question_type=item.get("QuestionType", ""),
            sub_type=item.get("SubQType"),
            question=item.get("Question", ""),
            reference=item.get("ProcessedAnswer", item.get("FinalAnswer", "")),
        )
    return tasks


def required_files(task: Task, config: Config) -> list[str]:
    """Paths (relative to the data root) a task needs, in the users' analyzer's order.

    The image for image and mix, the table text for text and mix, the xlsx for Visualization.
    """
    needed = []
    if config.modality in ("image", "mix"):
        needed.append(f"{IMAGE_DIR}/{task.file_name}{IMAGE_EXT}")
    if config.modality in ("text", "mix"):
        folder, ext = FORMATS[config.format]
        needed.append(f"{folder}/{task.file_name}{ext}")
    if task.question_type == "Visualization":
        needed.append(f"{XLSX_DIR}/{task.file_name}{XLSX_EXT}")
    return needed


ERROR_PREFIX = "[ERROR]"
_OOM = re.compile(r"out of memory|OutOfMemory|\bOOM\b", re.IGNORECASE)


def classify_error(prediction: str, modality: str) -> str:
    """The class of an ``[ERROR] ...`` prediction (oom_text, oom_image, missing_input, bad_input, format_failure,
    timeout, node_failure, other), from the prefixes the users' fork writes."""
    text = prediction[len(ERROR_PREFIX):].strip()
    if text.startswith("OOM: Text too large"):
        return "oom_text"
    if text.startswith("OOM: Image too large") or "DecompressionBomb" in text:
        return "oom_image"
    if text.startswith("File not found"):
        return "missing_input"
    if text.startswith("Failed to get proper final answer format"):
        return "format_failure"
    if _OOM.search(text):
        return "oom_image" if modality == "image" else "oom_text"
    if "timed out" in text.lower() or "timeout" in text.lower():
        return "timeout"
    return "other"
