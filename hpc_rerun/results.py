"""Result files in the three layouts the users' fork wrote, and run-directory checkpoints.

Layouts (all keep an item list under ``results``):
  a: {"config", "aggregate_metrics": {"by_question_type", "overall"}, "results"}
  b: {"config", "aggregate_metrics": {<QuestionType>: {...}}, "results"}
  c: {"configs": [...], "results", "aggregate_metrics"?}
  checkpoint: {"results", "processed_ids"} (a run directory's resume file)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .benchmark import is_error


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
        where = f"line {err.lineno}, column {err.colno}: {err.msg}" if isinstance(err, json.JSONDecodeError) else str(err)
        raise ResultFileError(f"{path}: not valid JSON ({where}); it is left untouched") from None
    layout = detect_layout(data)
    if layout is None:
        keys = ", ".join(sorted(data)) if isinstance(data, dict) else type(data).__name__
        raise ResultFileError(
            f"{path}: unknown result layout (top level: {keys}); expected a 'results' list beside "
            "'config', 'configs' or 'processed_ids'"
        )
    items = data["results"]
    for pos, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("id"), int) or isinstance(item.get("id"), bool):
            raise ResultFileError(f"{path}: results[{pos}] has no integer 'id'")
    return ResultFile(path=path, layout=layout, data=data, items=items)


def item_ok(item: dict) -> bool:
    """A successful item: a prediction that is not an ``[ERROR]`` record."""
    return not is_error(item.get("Prediction"))


def best_items(item_lists: list[list[dict]]) -> tuple[dict[int, dict], list[int]]:
    """The best item per id across sources in order (success over error, later over earlier).

    Returns the chosen items and the ids that occurred more than once within one source.
    """
    best: dict[int, dict] = {}
    duplicates: set[int] = set()
    for items in item_lists:
        seen: set[int] = set()
        for item in items:
            key = item["id"]
            if key in seen:
                duplicates.add(key)
            seen.add(key)
            current = best.get(key)
            if current is None or item_ok(item) or not item_ok(current):
                best[key] = item
    return best, sorted(duplicates)
