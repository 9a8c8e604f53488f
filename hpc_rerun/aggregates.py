"""A result file's ``aggregate_metrics`` and the users' scores made of them: one owner for the rules.

- Share rules: each file turns ECR/Pass into shares its own way (a fraction or a percentage, Pass over every
  item or over those whose code ran), found per level from its stored values; ``recompute_aggregates``
  rewrites a file's aggregates by its own rule, keeping the groups whose items did not change.
- Type scores and Overall: the users' notebook's metrics per question type (``TYPE_METRICS``), a type's
  score their mean, Overall the pooled mean of every value behind the type scores.
"""

from __future__ import annotations

from dataclasses import dataclass

QUESTION_TYPES = ["Fact Checking", "Numerical Reasoning", "Structure Comprehending", "Data Analysis", "Visualization"]
# The metrics of the users' notebook per question type (its TASK_METRICS, in its order): the score of a type
# in modality_summary.csv is their mean, the paper table shows each. ECR/Pass are % of all the type's items.
TYPE_METRICS = {"Fact Checking": ("F1", "EM"), "Numerical Reasoning": ("F1", "EM"),
                "Structure Comprehending": ("F1", "EM"), "Data Analysis": ("ROUGE-L", "F1", "EM"),
                "Visualization": ("ECR", "Pass")}
DEFAULT_TYPE_METRICS = ("F1", "EM")

BOOLEAN_METRICS = ("ECR", "Pass")


@dataclass(frozen=True)
class ShareRule:
    """How a file turns ECR/Pass into shares at one level (by question type, or overall): a fraction (0.66)
    or a percentage (66.2), and Pass over every item or over those whose code ran (ECR true). Files differ,
    even between their two levels; only their own stored values tell."""

    scale: float
    pass_over_ran: bool


SHARE_RULES = [ShareRule(scale, over_ran) for scale in (100.0, 1.0) for over_ran in (False, True)]


def is_rounded(aggregates: dict) -> bool:
    values = [v for group in aggregates.values() if isinstance(group, dict) for v in group.values()
              if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return bool(values) and all(round(v, 2) == v for v in values)


def metric_means(items: list[dict], rule: ShareRule, with_time: bool) -> dict:
    """Mean of each numeric metric over the items that have it; ECR as the share of true values over the
    group's items, Pass over them or over those with ECR true (``rule``)."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    ran = sum(1 for item in items if isinstance(item.get("Metrics"), dict) and item["Metrics"].get("ECR") is True)
    for item in items:
        metrics = item.get("Metrics") if isinstance(item.get("Metrics"), dict) else {}
        for name, value in metrics.items():
            if name in BOOLEAN_METRICS:
                sums[name] = sums.get(name, 0.0) + (value is True)
                counts[name] = ran if name == "Pass" and rule.pass_over_ran else len(items)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                sums[name] = sums.get(name, 0.0) + value
                counts[name] = counts.get(name, 0) + 1
        if with_time and isinstance(item.get("ProcessingTime"), (int, float)):
            sums["ProcessingTime"] = sums.get("ProcessingTime", 0.0) + item["ProcessingTime"]
            counts["ProcessingTime"] = counts.get("ProcessingTime", 0) + 1
    return {name: (sums[name] / counts[name] if counts[name] else 0.0) * (rule.scale if name in BOOLEAN_METRICS else 1)
            for name in sums}


def _ordered(new: dict, old: dict, rounded: bool) -> dict:
    """New values in the old key order (new keys after), rounded to 2 places if the old ones were."""
    keys = [k for k in old if k in new] + [k for k in new if k not in old]
    return {k: (round(new[k], 2) if rounded else new[k]) for k in keys}


def _disagreements(stored: dict, computed: dict, rounded: bool) -> list[str]:
    """``key: stored X, from the items Y`` for each stored number the computed group does not give back."""
    out = []
    for key, value in stored.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        got = computed.get(key)
        close = got is not None and (abs(round(got, 2) - value) < 1e-9 if rounded
                                     else abs(got - value) <= 1e-9 * max(1.0, abs(value)))
        if not close:
            out.append(f"{key}: stored {value}, from the items {'none' if got is None else round(got, 6)}")
    return out


def items_by_type(items: list[dict]) -> dict[object, list[dict]]:
    groups: dict[object, list[dict]] = {}
    for item in sorted(items, key=lambda i: i.get("id", 0)):
        groups.setdefault(item.get("QuestionType"), []).append(item)
    return groups


class Level:
    """One level of a file's aggregates (``by_question_type`` or flat groups, or ``overall``): its stored
    groups, the items behind each as the file holds them, and the rule that reproduces them."""

    def __init__(self, name: str, stored: dict[str, dict], groups: dict[object, list[dict]], rounded: bool):
        self.name, self.stored, self.rounded = name, stored, rounded
        self.with_time = any(isinstance(g, dict) and "ProcessingTime" in g for g in stored.values())
        self.rule, self.problems = None, []
        for rule in SHARE_RULES:
            problems = [f"{name}/{group}: {d}" for group, values in stored.items() if isinstance(values, dict)
                        for d in _disagreements(values, metric_means(groups.get(group, []), rule, self.with_time),
                                                rounded)]
            if not problems:
                self.rule, self.problems = rule, []
                break
            if rule == SHARE_RULES[0]:
                self.problems = problems

    def group(self, key, items: list[dict], unchanged: bool, rule: ShareRule) -> dict:
        """A group's values: as stored when its items did not change, else recomputed by ``rule``."""
        if unchanged and key in self.stored:
            return self.stored[key]
        return _ordered(metric_means(items, rule, self.with_time), self.stored.get(key, {}), self.rounded)


def recompute_aggregates(aggregates: dict, old_items: list[dict], items: list[dict], force: bool = False
                         ) -> tuple[dict, str | None]:
    """``aggregate_metrics`` for ``items``, by the rule the file itself used (inferred per level from its
    stored values and ``old_items``, the items they were computed from), in the shape it already has
    (nested by_question_type/overall or flat by QuestionType; rounded or not; with or without
    ProcessingTime; the same key order). A group whose items did not change keeps its stored values.
    When no rule gives the stored values back, the aggregates are returned as they were with a message
    naming what disagrees, unless ``force`` (then the first rule that fits the file's shares is used)."""
    nested = "by_question_type" in aggregates
    rounded = is_rounded(aggregates)
    old_groups, new_groups = items_by_type(old_items), items_by_type(items)
    by_type_stored = aggregates.get("by_question_type", {}) if nested else aggregates
    levels = [Level("by_question_type" if nested else "groups", by_type_stored, old_groups, rounded)]
    old_all, new_all = sorted(old_items, key=lambda i: i.get("id", 0)), sorted(items, key=lambda i: i.get("id", 0))
    if nested:
        levels.append(Level("overall", {"overall": aggregates.get("overall", {})}, {"overall": old_all}, rounded))
    problems = [p for level in levels for p in level.problems]
    if problems and not force:
        return aggregates, "no rule gives the stored aggregate_metrics back (" + "; ".join(problems[:6]) + \
            (f"; {len(problems) - 6} more" if len(problems) > 6 else "") + ")"
    fallback = ShareRule(_fraction_or_percent(aggregates), False)
    keep = not problems  # forced over values no rule gives back: every group from its items
    types = levels[0]
    by_type = {qt: types.group(qt, group, keep and old_groups.get(qt) == group, types.rule or fallback)
               for qt, group in new_groups.items()}
    by_type = _ordered(by_type, by_type_stored, False)
    if not nested:
        return by_type, None
    overall = levels[1].group("overall", new_all, keep and old_all == new_all, levels[1].rule or fallback)
    return {key: by_type if key == "by_question_type" else overall if key == "overall" else aggregates[key]
            for key in aggregates}, None


def _fraction_or_percent(aggregates: dict) -> float:
    """ECR/Pass as a fraction or a percentage, by the stored shares (only for --recompute-aggregates)."""
    shares = [group[m] for group in aggregates.values() if isinstance(group, dict)
              for m in BOOLEAN_METRICS if isinstance(group.get(m), (int, float))]
    return 1.0 if shares and all(v <= 1 for v in shares) else 100.0


class TypeMetrics(dict):
    """Question type -> metric -> value: the metrics of the users' notebook (``TYPE_METRICS``, in its order)
    as it counts them, means, and ECR/Pass as % of all the type's items. The summary's scores and the paper
    table are both made of these, so one configuration's numbers are read once; a plain dict underneath, so
    a merge's JSON report carries them."""

    def scores(self) -> dict[str, float]:
        """The users' score per question type: the mean of its metrics, where the type has all of them."""
        return {t: sum(m.values()) / len(m) for t, m in self.items()
                if len(m) == len(TYPE_METRICS.get(t, DEFAULT_TYPE_METRICS))}


def type_scores(items: list[dict]) -> dict[str, float]:
    """Per question type, the users' score of these items."""
    scores = {}
    for question_type, group in items_by_type(items).items():
        means = metric_means(group, ShareRule(100.0, False), with_time=False)
        wanted = TYPE_METRICS.get(question_type, DEFAULT_TYPE_METRICS)
        if all(m in means for m in wanted):
            scores[str(question_type)] = sum(means[m] for m in wanted) / len(wanted)
    return scores


def overall_score(scores: dict[str, float]) -> float:
    """The users' Overall: the mean of every metric value behind the type scores, pooled (a Data Analysis
    score stands for three values, the others for two), e.g. mix_latex's (2 FC + 2 NR + 2 SC + 3 DA + 2 Viz) / 11."""
    weights = {t: len(TYPE_METRICS.get(t, DEFAULT_TYPE_METRICS)) for t in scores}
    return sum(scores[t] * weights[t] for t in scores) / sum(weights.values())
