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

from .benchmark import ERROR_PREFIX


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
    if not all(type(item) is dict and type(item.get("id")) is int for item in items):  # fast path first
        for pos, item in enumerate(items):
            if not isinstance(item, dict) or type(item.get("id")) is not int:
                raise ResultFileError(f"{path}: results[{pos}] has no integer 'id'")
    return ResultFile(path=path, layout=layout, data=data, items=items)


def item_ok(item: dict) -> bool:
    """A successful item: a prediction that is not an ``[ERROR]`` record."""
    prediction = item.get("Prediction")
    return not (type(prediction) is str and prediction.startswith(ERROR_PREFIX))


def best_items(item_lists: list[list[dict]]) -> tuple[dict[int, dict], list[int]]:
    """The best item per id across sources in order (success over error, later over earlier).

    Returns the chosen items and the ids that occurred more than once within one source.
    """
    best: dict[int, dict] = {}
    best_ok: dict[int, bool] = {}
    duplicates: set[int] = set()
    for items in item_lists:
        seen: set[int] = set()
        for item in items:
            key = item["id"]
            if key in seen:
                duplicates.add(key)
            seen.add(key)
            ok = item_ok(item)
            if ok or not best_ok.get(key, False):
                best[key] = item
                best_ok[key] = ok
    return best, sorted(duplicates)


BOOLEAN_METRICS = ("ECR", "Pass")


def _is_rounded(aggregates: dict) -> bool:
    values = [v for group in aggregates.values() if isinstance(group, dict) for v in group.values()
              if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return bool(values) and all(round(v, 2) == v for v in values)


def _share_scale(aggregates: dict) -> float:
    """ECR/Pass as a fraction (0.66) or a percentage (66.2), as the file already has them."""
    shares = [group[m] for group in aggregates.values() if isinstance(group, dict)
              for m in BOOLEAN_METRICS if isinstance(group.get(m), (int, float))]
    return 1.0 if shares and all(v <= 1 for v in shares) else 100.0


def _means(items: list[dict], scale: float, with_time: bool, share_of: int | None = None) -> dict:
    """Mean of each numeric metric over the items that have it; ECR/Pass as the share of true values
    over ``share_of`` items (all items of the group by default)."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for item in items:
        metrics = item.get("Metrics") if isinstance(item.get("Metrics"), dict) else {}
        for name, value in metrics.items():
            if name in BOOLEAN_METRICS:
                sums[name] = sums.get(name, 0.0) + (value is True)
                counts[name] = share_of or len(items)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                sums[name] = sums.get(name, 0.0) + value
                counts[name] = counts.get(name, 0) + 1
        if with_time and isinstance(item.get("ProcessingTime"), (int, float)):
            sums["ProcessingTime"] = sums.get("ProcessingTime", 0.0) + item["ProcessingTime"]
            counts["ProcessingTime"] = counts.get("ProcessingTime", 0) + 1
    return {name: sums[name] / counts[name] * (scale if name in BOOLEAN_METRICS else 1) for name in sums}


def _ordered(new: dict, old: dict, rounded: bool) -> dict:
    """New values in the old key order (new keys after), rounded to 2 places if the old ones were."""
    keys = [k for k in old if k in new] + [k for k in new if k not in old]
    return {k: (round(new[k], 2) if rounded else new[k]) for k in keys}


def recompute_aggregates(aggregates: dict, items: list[dict]) -> dict:
    """``aggregate_metrics`` recomputed from the items, in the shape the file already has
    (nested by_question_type/overall or flat by QuestionType; fraction or percentage shares;
    rounded or not; with or without ProcessingTime; the same key order)."""
    nested = "by_question_type" in aggregates
    by_type_old = aggregates.get("by_question_type", {}) if nested else aggregates
    rounded, scale = _is_rounded(aggregates), _share_scale(aggregates)
    with_time = any(isinstance(g, dict) and "ProcessingTime" in g for g in by_type_old.values())
    groups: dict[str, list[dict]] = {}
    for item in items:
        groups.setdefault(item.get("QuestionType"), []).append(item)
    by_type = {qt: _ordered(_means(group, scale, with_time), by_type_old.get(qt, {}), rounded)
               for qt, group in groups.items()}
    by_type = _ordered(by_type, by_type_old, False)
    if not nested:
        return by_type
    overall = _means(items, scale, with_time, share_of=len(items))
    result = {}
    for key in aggregates:
        result[key] = by_type if key == "by_question_type" else _ordered(overall, aggregates["overall"], rounded) \
            if key == "overall" else aggregates[key]
    return result
