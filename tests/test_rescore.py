"""rescore: every answered item's Metrics recomputed from its own Reference and Prediction (the users' real
mini tree: text metrics, Visualization code in the sandbox, the judge placeholder)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from click.testing import CliRunner

from hpc_rerun.cli import EXIT_GAPS, main

from .conftest import MINI_DATA

MINI = Path(__file__).parent / "fixtures" / "realhitbench-mini"


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_an_untouched_tree_rescores_to_zero_changes_and_nothing_is_written(tmp_path):
    tree = tmp_path / "results"
    shutil.copytree(MINI / "results" / "complied", tree)
    files = lambda: {p: p.read_bytes() for p in tree.rglob("*") if p.is_file() and p.name != ".hpc-rerun.lock"}  # noqa: E731
    before = files()
    result = run_cli("rescore", tree, "--data-root", MINI_DATA, "--json", "--write")
    assert result.exit_code == 0, result.output
    configs = json.loads(result.output)["configs"]
    assert len(configs) == 5 and sum(c["items"] for c in configs) > 150
    assert all(c["changed_items"] == 0 and not c["written"] for c in configs)
    assert files() == before


def test_stored_metrics_that_differ_are_reported_then_written_and_nothing_else_changes(tmp_path):
    tree = tmp_path / "results"
    shutil.copytree(MINI / "results" / "complied", tree)
    path = tree / "qwen3vl_text" / "text_json" / "results.json"
    data = json.loads(path.read_text())
    text = next(i for i in data["results"] if "F1" in i["Metrics"] and not i["Prediction"].startswith("[ERROR]"))
    chart = next(i for i in data["results"] if i["Metrics"].get("ECR") is True)
    truth = {text["id"]: dict(text["Metrics"]), chart["id"]: dict(chart["Metrics"])}
    text["Metrics"]["F1"] = text["Metrics"]["F1"] + 7.0  # as a scorer with another rule might have stored
    chart["Metrics"]["Pass"] = not chart["Metrics"]["Pass"]
    path.write_text(json.dumps(data, indent=2))
    tampered = json.loads(path.read_text())

    result = run_cli("rescore", tree, "--data-root", MINI_DATA, "--config", "qwen3vl_text/text_json")
    assert result.exit_code == EXIT_GAPS, result.output
    assert "qwen3vl_text/text_json: 36 answered, 2 differ (F1 1, Pass 1)" in result.output
    assert json.loads(path.read_text()) == tampered, "nothing written without --write"

    result = run_cli("rescore", tree, "--data-root", MINI_DATA, "--config", "qwen3vl_text/text_json", "--write")
    assert result.exit_code == 0, result.output
    fixed = json.loads(path.read_text())
    by_id = {i["id"]: i for i in fixed["results"]}
    assert {k: by_id[k]["Metrics"] for k in truth} == truth
    others = [i for i in tampered["results"] if i["id"] not in truth]
    assert [by_id[i["id"]] for i in others] == others, "every other item as it was"
    assert [k for k in fixed if k != "results"] == [k for k in tampered if k != "results"]
    assert list(path.parent.glob("results.json.bak-*")), "a backup of the file as it was"
    # the excerpt's aggregates are the full file's: no rule gives them back, so they stay, and it says so
    assert fixed["aggregate_metrics"] == tampered["aggregate_metrics"]
    assert "aggregate_metrics left as they were" in result.output


def test_a_file_that_stores_pass_false_for_code_that_did_not_run_keeps_its_convention(tmp_path):
    """The benchmark writes Pass 'None' when the chart code does not run, some of the users' files False:
    rescoring such a file finds nothing to change, and a merged answer takes the file's convention."""
    tree = tmp_path / "results"
    shutil.copytree(MINI / "results" / "complied", tree)
    path = tree / "qwen3vl_resize_pic" / "image" / "results.json"
    data = json.loads(path.read_text())
    not_run = [i for i in data["results"] if i["Metrics"].get("ECR") is False]
    assert not_run, "the file has chart answers whose code did not run"
    for item in not_run:
        item["Metrics"]["Pass"] = False
    path.write_text(json.dumps(data, indent=2))
    result = run_cli("rescore", tree, "--data-root", MINI_DATA, "--config", "qwen3vl_resize_pic/image")
    assert result.exit_code == 0 and "0 differ" in result.output, result.output

    from hpc_rerun.merge import ConfigMerge, merge_items
    from hpc_rerun.rundir import Record

    record = {"id": 999_999, "QuestionType": "Visualization", "Prediction": "no code here",
              "Metrics": {"ECR": False, "Pass": "None"}}
    merged = merge_items(data["results"], {999_999: Record.from_dict(record)}, False, False, ConfigMerge("c", path))
    assert next(i for i in merged if i["id"] == 999_999)["Metrics"] == {"ECR": False, "Pass": False}
