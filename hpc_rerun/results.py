"""Result files in the three layouts the users' fork wrote, and run-directory checkpoints.

Layouts (all keep an item list under ``results``):
  a: {"config", "aggregate_metrics": {"by_question_type", "overall"}, "results"}
  b: {"config", "aggregate_metrics": {<QuestionType>: {...}}, "results"}
  c: {"configs": [...], "results", "aggregate_metrics"?}
  checkpoint: {"results", "processed_ids"} (a run directory's resume file)
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from .benchmark import ERROR_PREFIX

K = TypeVar("K")
T = TypeVar("T")


class ResultFileError(ValueError):
    """A result file that cannot be read; the message names the file, the position and the fix."""


@dataclass
class ResultFile:
    path: Path
    layout: str
    data: dict
    items: list[dict] = field(repr=False)

    @property
    def run_config(self) -> dict:
        """The run's own config block (first of ``configs`` for layout c; empty for checkpoints)."""
        if self.layout == "c":
            return self.data["configs"][0] if self.data["configs"] else {}
        return self.data.get("config") or {}


def detect_layout(data) -> str | None:
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        return None
    if "processed_ids" in data:
        return "checkpoint"
    if isinstance(data.get("configs"), list):
        return "c"
    if isinstance(data.get("config"), dict):
        aggregates = data.get("aggregate_metrics")
        return "a" if isinstance(aggregates, dict) and "by_question_type" in aggregates else "b"
    return None


def load_result_file(path: str | Path) -> ResultFile:
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            data = json.load(fh)
    except OSError as err:
        raise ResultFileError(f"{path}: cannot read ({err.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        where = (f"line {err.lineno}, column {err.colno}: {err.msg}" if isinstance(err, json.JSONDecodeError)
                 else str(err))
        raise ResultFileError(f"{path}: not valid JSON ({where}); it is left untouched") from None
    layout = detect_layout(data)
    if layout is None:
        keys = ", ".join(sorted(data)) if isinstance(data, dict) else type(data).__name__
        raise ResultFileError(
            f"{path}: unknown result layout (top level: {keys}); expected a 'results' list beside "
            "'config', 'configs' or 'processed_ids'"
        )
    items = data["results"]
    if not all(type(item) is dict and type(item.get("id")) is int for item in items):  # fast path first
        for pos, item in enumerate(items):
            if not isinstance(item, dict) or type(item.get("id")) is not int:
                raise ResultFileError(f"{path}: results[{pos}] has no integer 'id'")
    return ResultFile(path=path, layout=layout, data=data, items=items)


def item_ok(item: dict) -> bool:
    """A successful item: a prediction that is not an ``[ERROR]`` record."""
    prediction = item.get("Prediction")
    return not (type(prediction) is str and prediction.startswith(ERROR_PREFIX))


def best_of(candidates: Iterable[tuple[K, T, bool]]) -> dict[K, T]:
    """The one rule for which answer counts: per key, a success over an error, then the later one.
    ``candidates`` are (key, value, is a success), oldest first."""
    best: dict[K, tuple[T, bool]] = {}
    for key, value, ok in candidates:
        current = best.get(key)
        if current is None or ok or not current[1]:
            best[key] = (value, ok)
    return {key: value for key, (value, _) in best.items()}


def best_items(item_lists: list[list[dict]]) -> tuple[dict[int, dict], list[int]]:
    """The best item per id across sources in order (``best_of``: success over error, later over earlier).

    Returns the chosen items and the ids that occurred more than once within one source.
    """
    duplicates: set[int] = set()
    for items in item_lists:
        seen: set[int] = set()
        for item in items:
            if item["id"] in seen:
                duplicates.add(item["id"])
            seen.add(item["id"])
    best = best_of((item["id"], item, item_ok(item)) for items in item_lists for item in items)
    return best, sorted(duplicates)
