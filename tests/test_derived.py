"""The files users derive from aggregate_metrics, in their own shapes: aggregate_metrics.csv/.md beside each
result file, each variant's modality_summary.csv, the paper table results_table.tex. From the users' stored
aggregates they come out byte for byte as the users' own files; report rewrites only a file whose values
changed, and a merge refreshes them."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from hpc_rerun.aggregates import overall_score
from hpc_rerun.cli import main
from hpc_rerun.derived import (
    CSV_NAME,
    MARKDOWN_NAME,
    SUMMARY_NAME,
    aggregate_tables,
    aggregate_type_metrics,
    aggregate_type_scores,
    merge_figure,
    write_merge_report,
)
from hpc_rerun.results import load_result_file

MINI = Path(__file__).parent / "fixtures" / "realhitbench-mini"
COMPLIED = MINI / "results" / "complied"
STORED = json.loads((COMPLIED / "stored-aggregates.json").read_text())  # every FULL file's aggregate_metrics
SHARED = ["qwen3vl_text/text_html", "qwen3vl_text/text_json", "qwen3vl_default_pic/mix_markdown",
          "qwen3vl_resize_pic/image"]  # configurations whose folders (and the users' tables) are in the fixture


def users_tables() -> dict[str, dict[str, bytes]]:
    """The users' own aggregate_metrics.csv/.md of all 14 configurations that have them."""
    tables = {c: {n: t.encode() for n, t in files.items()}
              for c, files in json.loads((COMPLIED / "users-derived-tables.json").read_text()).items()}
    for config in SHARED:
        tables[config] = {n: (COMPLIED / config / n).read_bytes() for n in (CSV_NAME, MARKDOWN_NAME)}
    return tables


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def tree_bytes(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("config", sorted(users_tables()))
def test_the_users_own_tables_come_out_byte_for_byte_for_every_configuration(config):
    """All 14 configurations of the users' full tree, from the aggregates stored in their FULL result files:
    nested and flat, rounded and not, shares as fractions (shown as percentages) and percentages, with and
    without ProcessingTime (a full column, which the users' Markdown shows as numbers: 8.30 as 8.3)."""
    tables = aggregate_tables(STORED[config]["aggregate_metrics"])
    assert tables[CSV_NAME] == users_tables()[config][CSV_NAME]
    assert tables[MARKDOWN_NAME] == users_tables()[config][MARKDOWN_NAME]


def test_report_rewrites_nothing_that_is_current_and_creates_on_request(tmp_path):
    tree = tmp_path / "results"
    shutil.copytree(COMPLIED, tree)
    before = tree_bytes(tree)
    result = run_cli("report", tree, "--json")
    assert result.exit_code == 0 and all(v == [] for v in json.loads(result.stdout)["written"].values())
    assert tree_bytes(tree) == before, "no byte of the users' tree changes, results_table.tex included"
    (tree / "qwen3vl_text" / "text_html" / CSV_NAME).unlink()
    assert "0 file(s) written" in run_cli("report", tree).output, "a missing table is not made without --create"
    result = run_cli("report", tree, "--create")
    assert result.exit_code == 0 and "2 file(s) written" in result.output, "the table, and resize_pic's summary"
    assert (tree / "qwen3vl_resize_pic" / SUMMARY_NAME).exists()
    assert (tree / "qwen3vl_text" / "text_html" / CSV_NAME).read_bytes() == before[tree / "qwen3vl_text" /
                                                                                    "text_html" / CSV_NAME]


def test_a_table_that_shows_the_same_values_is_kept_and_a_stale_one_rewritten(tmp_path):
    """A file is rewritten only when a value it shows changed: another number format (8.30 for the 8.3 the
    users' tabulate writes), other row orders or padding are the file's own; a wrong value is not."""
    tree = tmp_path / "results"
    shutil.copytree(COMPLIED, tree)
    folder = tree / "qwen3vl_text" / "text_json"
    markdown, table = folder / MARKDOWN_NAME, folder / CSV_NAME
    lines = table.read_text().splitlines(keepends=True)
    table.write_text(lines[0] + "".join(reversed(lines[1:])))  # rows in another order
    markdown.write_text(markdown.read_text().replace("|             5.94 |", "|            5.940 |"))
    assert "5.940" in markdown.read_text()
    other_format = tree_bytes(tree)
    assert all(v == [] for v in json.loads(run_cli("report", tree, "--json").stdout)["written"].values())
    assert tree_bytes(tree) == other_format
    table.write_text(table.read_text().replace("45.357436", "45.357437"))  # a value the aggregates do not give
    result = json.loads(run_cli("report", tree, "--json").stdout)
    assert result["written"]["qwen3vl_text/text_json"] == [str(table)]
    assert table.read_bytes() == (COMPLIED / "qwen3vl_text" / "text_json" / CSV_NAME).read_bytes()


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
    assert untouched.read_bytes() == (COMPLIED / "qwen3vl_text" / "text_json" / CSV_NAME).read_bytes()


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
        assert 600 <= chart.size[0] <= 1600 and 300 <= chart.size[1] <= 1600, chart.size


def test_scores_per_question_type_are_the_users_modality_summary_and_the_charts_show_them(tmp_path):
    """Their summary's score per question type, from the stored aggregates: to 1e-6 from unrounded ones, to
    0.01 from rounded ones. (text_json's Visualization needs its Pass rule, found from its full items; the
    excerpt cannot tell, so only its text types are compared.)"""
    import csv

    from PIL import Image


    complied = COMPLIED
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
    old, new = summary_lines(COMPLIED / "qwen3vl_text" / SUMMARY_NAME), summary_lines(summary)
    assert [k for k in old if old[k] != new[k]] == ["text_html"] and list(old) == list(new)
    merged = load_result_file(tree / "complied" / "qwen3vl_text" / "text_html" / "results.json")
    scores = aggregate_type_scores(merged.data["aggregate_metrics"], merged.items)
    row = [float(v) for v in new["text_html"].split(b",")[1:]]
    assert row == pytest.approx([*scores.values(), overall_score(scores)], abs=1e-9)
    other = tree / "complied" / "qwen3vl_default_pic" / SUMMARY_NAME
    assert other.read_bytes() == (COMPLIED / "qwen3vl_default_pic" / SUMMARY_NAME).read_bytes()


def test_report_creates_a_summary_on_request_in_the_users_shape(tmp_path):

    tree = tmp_path / "results"
    shutil.copytree(COMPLIED, tree)
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



def users_pass_over_ran(config: str) -> bool:
    """Whether a file's stored Pass counts only the items whose code ran: the users' own summary (Pass over
    all the type's items) tells, for the ten text and mix configurations it shows."""
    variant, leaf = config.split("/")
    path = COMPLIED / variant / SUMMARY_NAME
    rows = {row[""]: float(row["Visualization"]) for row in csv.DictReader(path.open())} if path.exists() else {}
    visualization = aggregate_type_metrics(STORED[config]["aggregate_metrics"])["Visualization"]
    return leaf in rows and abs(sum(visualization.values()) / 2 - rows[leaf]) > 0.01


def stored_metrics(config: str):
    """A configuration's metrics from its FULL file's stored aggregates, its Pass rule as the users' summary
    shows it (the fixture holds excerpts of the items, which cannot show it)."""
    metrics = aggregate_type_metrics(STORED[config]["aggregate_metrics"])
    if users_pass_over_ran(config):
        metrics["Visualization"]["Pass"] *= metrics["Visualization"]["ECR"] / 100
    return metrics


def test_the_paper_table_comes_out_byte_for_byte_from_every_configurations_aggregates():
    """results_table.tex as the users' notebook wrote it from the items of 11 FULL files, from the aggregates
    those files store (two of them count Pass over the items whose code ran; the table over all)."""
    from hpc_rerun.paper_table import ROWS, render

    assert [c for c in ROWS if users_pass_over_ran(c)] == ["qwen3vl_text/text_json", "qwen3vl_default_pic/mix_json"]
    assert render({c: stored_metrics(c) for c in ROWS}).encode() == (COMPLIED / "results_table.tex").read_bytes()


def test_report_makes_the_paper_table_only_with_create_in_the_users_layout(tmp_path):
    tree = tmp_path / "results"
    shutil.copytree(COMPLIED, tree)
    table = tree / "results_table.tex"
    users = table.read_text().split("\n")
    table.unlink()
    result = json.loads(run_cli("report", tree, "--json").stdout)
    assert result["written"]["paper table"] == [] and not table.exists()
    result = json.loads(run_cli("report", tree, "--create", "--json").stdout)
    assert result["written"]["paper table"] == [str(table)]
    made = table.read_text().split("\n")
    assert made[:10] == users[:10] and made[-4:] == users[-4:], "the users' header and footer, no final newline"
    rows = {line.split(" & ")[1]: line for line in made[10:-4]}
    assert list(rows) == ["Text (HTML)", "Text (JSON)", "Mix (Markdown)"], "the configurations of this tree, in order"
    for label in ("Text (HTML)", "Mix (Markdown)"):  # from the excerpts' stored (full) aggregates
        assert rows[label] == next(line for line in users if f" & {label} & " in line)


def test_a_merge_rewrites_the_paper_table_cells_it_changed_and_nothing_else(tmp_path):
    from hpc_rerun.paper_table import row_cells

    tree = tmp_path / "results"
    shutil.copytree(MINI / "results", tree)
    table = tree / "complied" / "results_table.tex"
    before = table.read_text().split("\n")
    result = run_cli("merge-shards", "--into", tree / "complied", "--from", tree / "rerun-text_html-truncate",
                     "--recompute-aggregates")
    assert result.exit_code == 0, result.output
    after = table.read_text().split("\n")
    assert [n for n, (old, new) in enumerate(zip(before, after)) if old != new] == [11] and len(after) == len(before)
    merged = load_result_file(tree / "complied" / "qwen3vl_text" / "text_html" / "results.json")
    cells = row_cells(aggregate_type_metrics(merged.data["aggregate_metrics"], merged.items))
    assert after[11] == " & Text (HTML) & " + " & ".join(cells) + r" \\"


def merge_rows(configs: list[str], changed_every: int = 3) -> list[dict]:
    """Before/after rows as a merge reports them, from the users' stored scores with a few changes."""

    rows = []
    for n, config in enumerate(configs):
        for m, (question_type, score) in enumerate(aggregate_type_scores(STORED[config]["aggregate_metrics"]).items()):
            ids = [1000 + 10 * n + m] if (n + m) % changed_every == 0 else []
            rows.append({"config": config, "question_type": question_type, "before": score,
                         "after": score + (0.37 if ids else 0.0), "changed": ids})
    return rows


@pytest.mark.parametrize("count", [12, 1])
def test_the_merge_report_is_a_heat_map_per_variant_readable_at_any_size(tmp_path, count):
    """The users' 12-configuration merge and a 1-configuration one: one panel per variant, a line per
    configuration, a picture of a size a screen shows whole; the Markdown names every change."""
    import matplotlib.pyplot as plt
    from PIL import Image


    configs = [c for c, stored in STORED.items() if stored["aggregate_metrics"]][:count]
    rows = merge_rows(configs)
    markdown, chart = write_merge_report(tmp_path / "merge-report", rows)
    with Image.open(chart) as image:
        assert 600 <= image.size[0] <= 1600 and 300 <= image.size[1] <= 1600, image.size
    figure = merge_figure(rows)
    panels = [axis for axis in figure.axes if axis.get_label() != "<colorbar>"]
    variants = sorted({c.split("/")[0] for c in configs})
    assert sorted(axis.get_title(loc="left") for axis in panels) == variants
    assert sorted(label.get_text() for axis in panels for label in axis.get_yticklabels()) == \
        sorted(c.split("/")[1] for c in configs)
    plt.close(figure)
    text = markdown.read_text()
    for row in rows:
        assert row["config"] in text and all(str(i) in text for i in row["changed"])


def test_a_configuration_the_users_summary_does_not_show_gets_a_row_only_with_create(tmp_path):
    """Their default_pic summary has no image row though default_pic/image exists: report keeps it so;
    --create adds the row where the users' order puts it, every other line byte for byte."""
    tree = tmp_path / "results"
    shutil.copytree(COMPLIED, tree)
    shutil.copytree(COMPLIED / "qwen3vl_resize_pic" / "image", tree / "qwen3vl_default_pic" / "image")
    summary = tree / "qwen3vl_default_pic" / SUMMARY_NAME
    before = tree_bytes(tree)
    result = run_cli("report", tree)
    assert result.exit_code == 0 and tree_bytes(tree) == before, result.output
    assert run_cli("report", tree, "--create").exit_code == 0
    old, new = before[summary].decode().splitlines(), summary.read_text().splitlines()
    assert new[1].startswith("image,") and [new[0], *new[2:]] == old
