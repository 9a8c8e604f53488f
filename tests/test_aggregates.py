"""aggregate_metrics by each file's own rule: the users' files differ (percent or fraction per level, Pass over
every Visualization item or over those whose code ran, rounded or not), and only their stored values say
which. Recomputing unchanged items must give every stored value back; a merge changes only the groups whose
items changed; a file no rule reproduces is left as it was."""

from __future__ import annotations

import copy
import math
import random

import pytest

from hpc_rerun.aggregates import recompute_aggregates

TEXT_TYPES = ["Fact Checking", "Numerical Reasoning", "Structure Comprehending", "Data Analysis"]


def items(seed: int = 0, charts: int = 154, ran: int = 80, passed: int = 5, text: int = 2899) -> list[dict]:
    """Text items with their four scores, and Visualization items of which ``ran`` have ECR true and
    ``passed`` of those Pass true (the others store 'None' or False, as the users' files do)."""
    rng = random.Random(seed)
    out = []
    for n in range(text):
        f1 = rng.choice([0.0, 100.0, rng.uniform(0, 100)])
        out.append({"id": n, "QuestionType": TEXT_TYPES[n % 4], "Metrics": {
            "F1": f1, "EM": 100.0 if f1 == 100.0 else 0.0, "ROUGE-L": f1, "SacreBLEU": rng.uniform(0, 30)},
            "ProcessingTime": rng.uniform(1, 9)})
    for n in range(charts):
        ecr = n < ran
        out.append({"id": text + n, "QuestionType": "Visualization",
                    "Metrics": {"ECR": ecr, "Pass": (n < passed) if ecr else rng.choice(["None", False])},
                    "ProcessingTime": rng.uniform(10, 40)})
    return out


def mean(values) -> float:
    """Correctly rounded (math.fsum), as pandas or numpy may sum: a plain sum can differ in the last digits,
    so only keeping a stored value gives it back exactly."""
    values = list(values)
    return math.fsum(values) / len(values)


def stored(all_items: list[dict], *, nested: bool, type_scale: float, overall_scale: float = 100.0,
           pass_over_ran: bool = False, rounded: bool = True, with_time: bool = False) -> dict:
    """aggregate_metrics as a users' script with that rule writes them (computed here on their own)."""
    r = (lambda v: round(v, 2)) if rounded else (lambda v: v)

    def group(group_items, scale):
        values = {}
        charts = [i for i in group_items if "ECR" in i["Metrics"]]
        if charts:
            ran = [i for i in charts if i["Metrics"]["ECR"] is True]
            values["ECR"] = r(len(ran) / len(group_items) * scale)
            passed = sum(1 for i in charts if i["Metrics"]["Pass"] is True)
            values["Pass"] = r(passed / (len(ran) if pass_over_ran else len(group_items)) * scale)
        texts = [i for i in group_items if "F1" in i["Metrics"]]
        for metric in ("F1", "EM", "ROUGE-L", "SacreBLEU"):
            if texts:
                values[metric] = r(mean(i["Metrics"][metric] for i in texts))
        if with_time:
            values["ProcessingTime"] = r(mean(i["ProcessingTime"] for i in group_items))
        return values

    by_type = {qt: group([i for i in all_items if i["QuestionType"] == qt], type_scale)
               for qt in ["Fact Checking", "Data Analysis", "Visualization", "Numerical Reasoning",
                          "Structure Comprehending"]}
    if not nested:
        return by_type
    return {"by_question_type": by_type, "overall": group(all_items, overall_scale)}


CASES = {
    # layout a, percentages at both levels although the overall shares are below 1 (Pass 5 of 3,053 = 0.16)
    "percent, overall below 1": dict(nested=True, type_scale=100.0, overall_scale=100.0),
    # layout b, Pass over the items whose code ran (28 of 80 = 35.0), unrounded, with ProcessingTime
    "Pass over ECR-true": dict(nested=False, type_scale=100.0, pass_over_ran=True, rounded=False, with_time=True),
    # shares as fractions beside percentage text scores, rounded and not
    "fractions, rounded": dict(nested=False, type_scale=1.0),
    "fractions, unrounded": dict(nested=False, type_scale=1.0, rounded=False),
    "fraction overall, percent by type": dict(nested=True, type_scale=100.0, overall_scale=1.0),
}


@pytest.mark.parametrize("case", CASES)
def test_unchanged_items_give_every_stored_value_back_exactly(case):
    base = items(passed=28 if CASES[case].get("pass_over_ran") else 5)
    aggregates = stored(base, **CASES[case])
    recomputed, problem = recompute_aggregates(aggregates, base, copy.deepcopy(base))
    assert problem is None
    assert recomputed == aggregates and list(recomputed) == list(aggregates)


@pytest.mark.parametrize("case", CASES)
def test_a_merge_changes_only_the_groups_whose_items_changed(case):
    base = items(passed=28 if CASES[case].get("pass_over_ran") else 5)
    aggregates = stored(base, **CASES[case])
    merged = copy.deepcopy(base)
    chart = next(i for i in merged if i["QuestionType"] == "Visualization" and i["Metrics"]["ECR"] is False)
    chart["Metrics"] = {"ECR": True, "Pass": True}  # an [ERROR] chart answered and passed by the rerun
    merged.append({"id": 99_999, "QuestionType": "Fact Checking", "ProcessingTime": 3.0,
                   "Metrics": {"F1": 100.0, "EM": 100.0, "ROUGE-L": 100.0, "SacreBLEU": 12.0}})
    recomputed, problem = recompute_aggregates(aggregates, base, merged)
    assert problem is None
    expected = stored(merged, **CASES[case])
    by_type = recomputed.get("by_question_type", recomputed)
    old_by_type = aggregates.get("by_question_type", aggregates)
    for question_type in by_type:
        if question_type in ("Visualization", "Fact Checking"):
            assert by_type[question_type] == pytest.approx(expected.get("by_question_type", expected)[question_type])
            assert by_type[question_type] != old_by_type[question_type]
        else:
            assert by_type[question_type] == old_by_type[question_type], "untouched groups keep their numbers"
    if "overall" in recomputed:
        assert recomputed["overall"] == pytest.approx(expected["overall"])


def test_a_file_no_rule_reproduces_is_left_as_it_was_and_the_message_says_what_disagrees():
    base = items()
    aggregates = stored(base, nested=True, type_scale=100.0)
    aggregates["by_question_type"]["Numerical Reasoning"]["F1"] = 12.34  # computed from other items than these
    merged = base + [{"id": 99_999, "QuestionType": "Numerical Reasoning", "Metrics": {"F1": 0.0}}]
    recomputed, problem = recompute_aggregates(aggregates, base, merged)
    assert recomputed is aggregates
    assert "by_question_type/Numerical Reasoning: F1: stored 12.34, from the items" in problem
    forced, problem = recompute_aggregates(aggregates, base, merged, force=True)
    assert problem is None and forced["by_question_type"]["Numerical Reasoning"]["F1"] != 12.34
