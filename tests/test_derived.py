"""The tables users derive from aggregate_metrics (aggregate_metrics.csv / .md), in their own shapes: from the
users' stored aggregates they come out byte for byte as the users' own files, and a merge refreshes them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from hpc_rerun.cli import main
from hpc_rerun.derived import CSV_NAME, MARKDOWN_NAME, aggregate_tables

MINI = Path(__file__).parent / "fixtures" / "realhitbench-mini"
SHARED = ["qwen3vl_text/text_html", "qwen3vl_text/text_json", "qwen3vl_default_pic/mix_markdown",
          "qwen3vl_resize_pic/image"]


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("config", SHARED)
def test_the_users_own_tables_come_out_byte_for_byte(config):
    """Four real files, four layouts and conventions: nested and flat, rounded and not, shares as fractions
    (shown as percentages) and percentages, with and without ProcessingTime."""
    folder = MINI / "results" / "complied" / config
    aggregates = json.loads((folder / "results.json").read_text())["aggregate_metrics"]
    tables = aggregate_tables(aggregates)
    assert tables[CSV_NAME] == (folder / CSV_NAME).read_bytes()
    assert tables[MARKDOWN_NAME] == (folder / MARKDOWN_NAME).read_bytes()


def test_report_rewrites_nothing_that_is_current_and_creates_on_request(tmp_path):
    tree = tmp_path / "results"
    shutil.copytree(MINI / "results" / "complied", tree)
    before = {p: p.read_bytes() for p in tree.rglob("aggregate_metrics.*")}
    result = run_cli("report", tree, "--json")
    assert result.exit_code == 0 and all(v == [] for v in json.loads(result.stdout)["written"].values())
    assert {p: p.read_bytes() for p in tree.rglob("aggregate_metrics.*")} == before
    (tree / "qwen3vl_text" / "text_html" / CSV_NAME).unlink()
    assert "0 file(s) written" in run_cli("report", tree).output, "a missing table is not made without --create"
    result = run_cli("report", tree, "--create")
    assert result.exit_code == 0 and "2 file(s) written" in result.output, "the table, and resize_pic's summary"
    assert (tree / "qwen3vl_resize_pic" / "modality_summary.csv").exists()
    assert (tree / "qwen3vl_text" / "text_html" / CSV_NAME).read_bytes() == before[tree / "qwen3vl_text" /
                                                                                    "text_html" / CSV_NAME]


def test_a_merge_refreshes_the_tables_beside_the_file_it_changed(tmp_path):
    tree = tmp_path / "results"
    shutil.copytree(MINI / "results", tree)
    folder = tree / "complied" / "qwen3vl_text" / "text_html"
    original = (folder / CSV_NAME).read_bytes()
    result = run_cli("merge-shards", "--into", tree / "complied", "--from", tree / "rerun-text_html-truncate",
                     "--recompute-aggregates")
    assert result.exit_code == 0, result.output
    aggregates = json.loads((folder / "results.json").read_text())["aggregate_metrics"]
    assert (folder / CSV_NAME).read_bytes() == aggregate_tables(aggregates)[CSV_NAME] != original
    assert (folder / MARKDOWN_NAME).read_bytes() == aggregate_tables(aggregates)[MARKDOWN_NAME]
    untouched = tree / "complied" / "qwen3vl_text" / "text_json" / CSV_NAME
    assert untouched.read_bytes() == (MINI / "results" / "complied" / "qwen3vl_text" / "text_json" / CSV_NAME).read_bytes()


def test_a_merge_writes_a_before_and_after_report_naming_every_changed_item(gappy_benchmark, tiny_model_dir):
    """Into the run directory: per configuration and question type the score before and after, and the ids
    the merge changed, as Markdown and a chart."""
    from PIL import Image

    from hpc_rerun.rundir import ShardSpec, records_path

    from .test_runs import plan_run

    run_dir = plan_run(gappy_benchmark, tiny_model_dir, 1)
    spec_path = run_dir / "attempt-1" / "shard-0000.json"
    tasks = ShardSpec.read(spec_path).tasks
    with open(records_path(spec_path), "w") as out:
        for task in tasks:
            out.write(json.dumps({"id": task["id"], "Prediction": "Yes", "QuestionType": "Fact Checking",
                                  "Metrics": {"F1": 100.0, "EM": 100.0, "ROUGE-L": 100.0, "SacreBLEU": 100.0},
                                  "provenance": {"config": task["config"], "attempt": 1}}) + "\n")
    result = run_cli("merge-shards", run_dir)
    assert result.exit_code == 0, result.output
    report = (run_dir / "merge-report.md").read_text()
    for task in tasks:
        assert str(task["id"]) in report, task
    assert "qwen3vl_text/text_json" in report and "| before" in report.replace("|   before", "| before")
    with Image.open(run_dir / "merge-report.png") as chart:
        assert chart.size[0] >= 600 and chart.size[1] >= 400


def test_scores_per_question_type_are_the_users_modality_summary_and_the_charts_show_them(tmp_path):
    """Their summary's score per question type, from the stored aggregates: to 1e-6 from unrounded ones, to
    0.01 from rounded ones. (text_json's Visualization needs its Pass rule, found from its full items; the
    excerpt cannot tell, so only its text types are compared.)"""
    import csv

    from PIL import Image

    from hpc_rerun.derived import aggregate_type_scores, overall_score

    complied = MINI / "results" / "complied"
    summary, overall = {}, {}
    for variant in ("qwen3vl_text", "qwen3vl_default_pic"):
        with open(complied / variant / "modality_summary.csv") as fh:
            for row in csv.DictReader(fh):
                summary[f"{variant}/{row['']}"] = {k: float(v) for k, v in row.items() if k not in ("", "Overall")}
                overall[f"{variant}/{row['']}"] = float(row["Overall"])
    checks = {"qwen3vl_text/text_html": (0.01, None), "qwen3vl_default_pic/mix_markdown": (1e-6, None),
              "qwen3vl_text/text_json": (1e-6, "Visualization")}
    for config, (tolerance, skip) in checks.items():
        aggregates = json.loads((complied / config / "results.json").read_text())["aggregate_metrics"]
        ours = aggregate_type_scores(aggregates)
        theirs = {k: v for k, v in summary[config].items() if k != skip}
        assert list(ours) == list(summary[config]), "the users' order of question types"
        for question_type, value in theirs.items():
            assert ours[question_type] == pytest.approx(value, abs=tolerance), (config, question_type)
        if skip is None:  # Overall: every metric value behind the type scores, pooled
            assert overall_score(ours) == pytest.approx(overall[config], abs=tolerance), config
        assert overall_score(summary[config]) == pytest.approx(overall[config], abs=1e-9), "their own rule"
    tree = tmp_path / "results"
    shutil.copytree(complied, tree)
    result = run_cli("report", tree, "--charts")
    assert result.exit_code == 0, result.output
    for chart in (tree / "qwen3vl_text" / "text_html" / "text_html_scores.png", tree / "qwen3vl_text" /
                  "scores_heatmap.png"):
        with Image.open(chart) as image:
            assert image.size[0] > 600 and image.getextrema() != ((255, 255), (255, 255), (255, 255), (255, 255))


def summary_lines(path: Path) -> dict[str, bytes]:
    return {line.split(b",")[0].decode(): line for line in path.read_bytes().splitlines()}


def test_report_keeps_the_users_summary_and_a_merge_rewrites_only_the_rows_it_changed(tmp_path):
    """modality_summary.csv per variant: ``report`` leaves the users' file as it is (its cells agree with the
    aggregates; text_json's Visualization, whose Pass rule the excerpt cannot show, is kept with a warning).
    A merge into text_html rewrites text_html's row, its cells and Overall from the new aggregates, and
    leaves every other line byte for byte."""
    from hpc_rerun.derived import SUMMARY_NAME, aggregate_type_scores, overall_score
    from hpc_rerun.results import load_result_file

    tree = tmp_path / "results"
    shutil.copytree(MINI / "results", tree)
    summary = tree / "complied" / "qwen3vl_text" / SUMMARY_NAME
    before = summary.read_bytes()
    result = CliRunner().invoke(main, ["report", str(tree / "complied")])
    assert result.exit_code == 0, result.output
    assert summary.read_bytes() == before
    assert "text_json Visualization is 35.526315789473685" in result.output, result.output
    result = run_cli("merge-shards", "--into", tree / "complied", "--from", tree / "rerun-text_html-truncate",
                     "--recompute-aggregates")
    assert result.exit_code == 0, result.output
    old, new = summary_lines(MINI / "results" / "complied" / "qwen3vl_text" / SUMMARY_NAME), summary_lines(summary)
    assert [k for k in old if old[k] != new[k]] == ["text_html"] and list(old) == list(new)
    merged = load_result_file(tree / "complied" / "qwen3vl_text" / "text_html" / "results.json")
    scores = aggregate_type_scores(merged.data["aggregate_metrics"], merged.items)
    row = [float(v) for v in new["text_html"].split(b",")[1:]]
    assert row == pytest.approx([*scores.values(), overall_score(scores)], abs=1e-9)
    other = tree / "complied" / "qwen3vl_default_pic" / SUMMARY_NAME
    assert other.read_bytes() == (MINI / "results" / "complied" / "qwen3vl_default_pic" / SUMMARY_NAME).read_bytes()


def test_report_creates_a_summary_on_request_in_the_users_shape(tmp_path):
    from hpc_rerun.derived import SUMMARY_NAME, aggregate_type_scores, overall_score
    from hpc_rerun.results import load_result_file

    tree = tmp_path / "results"
    shutil.copytree(MINI / "results" / "complied", tree)
    summary = tree / "qwen3vl_text" / SUMMARY_NAME
    summary.unlink()
    assert run_cli("report", tree).exit_code == 0 and not summary.exists(), "made only with --create"
    assert run_cli("report", tree, "--create").exit_code == 0
    lines = summary.read_bytes().decode().splitlines()
    assert lines[0] == ",Fact Checking,Numerical Reasoning,Structure Comprehending,Data Analysis,Visualization,Overall"
    assert [line.split(",")[0] for line in lines[1:]] == ["text_html", "text_json"], "the users' format order"
    result = load_result_file(tree / "qwen3vl_text" / "text_html" / "results.json")
    scores = aggregate_type_scores(result.data["aggregate_metrics"], result.items)
    assert [float(v) for v in lines[1].split(",")[1:]] == [*scores.values(), overall_score(scores)]

