"""scan: the truth about what is missing, on real result files and on synthetic trees of every shape."""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from hpc_rerun.benchmark import Config, classify_error, load_tasks
from hpc_rerun.cli import EXIT_BAD_INPUT, EXIT_GAPS, main
from hpc_rerun.scan import scan_tree, skip_ids_report
from hpc_rerun.synthetic import ERROR_PREDICTIONS, make_item, write_result_file

from .conftest import MINI_DATA
from .trees import write_data_root

MINI = Path(__file__).parent / "fixtures" / "realhitbench-mini"
COMPILED = MINI / "results" / "complied"
FULL_TASKS = MINI / "QA_final_sc_filled.json"
# Files absent from the published data (docs/facts.md).
MISSING_IN_PUBLISHED_DATA = {
    *(f"{d}/society-table10_swap{e}" for d, e in [("latex", ".txt"), ("html", ".html"), ("csv", ".csv"),
                                                  ("markdown", ".md"), ("json", ".json"), ("tables", ".xlsx")]),
    "html/labor-table68.html",
    "json/health-table09.json",
    "tables/health-table09.xlsx",
}


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def mini_data_root(tmp_path_factory) -> Path:
    """The mini data with its table images, which the data copy lacks: rendered here."""
    root = tmp_path_factory.mktemp("data")
    for folder in MINI_DATA.iterdir():
        (root / folder.name).symlink_to(folder)
    (root / "image").mkdir()
    names = {q["FileName"] for q in json.loads((MINI / "QA_mini.json").read_text())["queries"]}
    for name in names:
        Image.new("RGB", (64, 32), "white").save(root / "image" / f"{name}.png")
    return root


@pytest.fixture(scope="module")
def full_tasks():
    return load_tasks(FULL_TASKS)


def real_reports() -> dict[str, dict]:
    reports = {}
    for path in COMPILED.glob("*/*/skip_ids.full-benchmark.json"):
        report = json.loads(path.read_text())
        reports[f"{path.parent.parent.name}/{path.parent.name}"] = report
    return reports


REPORT_SETS = ("skip_ids", "error_ids")
CATEGORY_SETS = ("file_dependency_issues", "incomplete_runs")


def test_real_mini_files_match_the_users_analyzer(mini_data_root):
    """The real cut-down files, scanned against the 39 mini tasks, agree with the real reports."""
    mini_tasks = load_tasks(MINI / "QA_mini.json")
    report = scan_tree(COMPILED, mini_tasks, MINI / "QA_mini.json", mini_data_root)
    assert report.problems == []
    assert {c.config.name for c in report.configs} == set(real_reports())
    for scan in report.configs:
        real = real_reports()[scan.config.name]
        ours = skip_ids_report(scan, COMPILED, "QA_mini.json")
        assert ours["metadata"]["result_file"] == real["metadata"]["result_file"]
        for key in REPORT_SETS:
            assert ours[key] == sorted(set(real[key]) & set(mini_tasks)), (scan.config.name, key)
        for key in CATEGORY_SETS:
            assert ours["categorized"][key] == sorted(set(real["categorized"][key]) & set(mini_tasks))
        for task_id, reason in ours["skip_reasons"].items():
            assert reason == real["skip_reasons"][task_id], (scan.config.name, task_id)


def test_full_benchmark_reports_equal_the_users_analyzer(tmp_path, full_tasks):
    """Rebuild each config's full 3071-task file from its real report and scan it: the same sets."""
    data_root = write_data_root(tmp_path / "data", full_tasks, MISSING_IN_PUBLISHED_DATA)
    reports = real_reports()
    for name, real in reports.items():
        config = Config.parse(name)
        absent, errors = set(real["skip_ids"]), set(real["error_ids"])
        items = [
            make_item(t, ERROR_PREDICTIONS["oom_text"] if t.id in errors else "42")
            for t in full_tasks.values() if t.id not in absent
        ]
        random.Random(7).shuffle(items)  # real files are not always sorted
        write_result_file(tmp_path / "tree" / real["metadata"]["result_file"], "b", config, items)
    result = run_cli("scan", tmp_path / "tree", "--data-root", data_root, "--tasks", FULL_TASKS, "--write-reports")
    assert result.exit_code == 0, result.output
    for name, real in reports.items():
        ours = json.loads((tmp_path / "tree" / real["metadata"]["result_file"]).with_name("skip_ids.json").read_text())
        assert list(ours) == list(real)
        assert list(ours["statistics"]) == list(real["statistics"])
        assert ours["statistics"] == real["statistics"], name
        for key in REPORT_SETS:
            assert ours[key] == real[key], (name, key)
        assert ours["categorized"] == real["categorized"], name
        assert ours["skip_reasons"] == real["skip_reasons"], name
        assert {k: v for k, v in ours["metadata"].items() if k not in ("analysis_time", "master_task_list")} == {
            k: v for k, v in real["metadata"].items() if k not in ("analysis_time", "master_task_list")
        }


@pytest.fixture
def gappy_tree(tmp_path, full_tasks):
    """Three configs in the three layouts with every kind of gap, on a subset of the real tasks."""
    tasks = {i: full_tasks[i] for i in [*range(1, 31), 577, 578, 580, 1638, 2960, 2961]}
    data_root = write_data_root(tmp_path / "data", tasks, {"json/health-table09.json", "tables/health-table09.xlsx",
                                                           "image/employment-table01.png",
                                                           "csv/society-table10_swap.csv"})
    tree = tmp_path / "tree"
    t = tasks
    # text_json, layout a, unsorted: each error class once, a duplicate, an unknown id, absent ids.
    items = [make_item(t[i], "ok") for i in range(1, 21)]
    items += [make_item(t[21 + n], ERROR_PREDICTIONS[c]) for n, c in enumerate(ERROR_PREDICTIONS)]
    items += [make_item(t[3], "ok again"), dict(make_item(t[1], "x"), id=99999)]
    items += [make_item(t[577], ERROR_PREDICTIONS["missing_input"])]
    items.reverse()
    write_result_file(tree / "qwen3vl_text" / "text_json" / "results.json", "a", Config.parse("x/text_json"), items)
    # image, layout c, file not named results.json; employment-table01.png is missing.
    items = [make_item(t[i], "ok") for i in range(5, 31)]
    write_result_file(tree / "qwen3vl_resize_pic" / "image" / "results_image_merged.json", "c",
                      Config.parse("x/image"), items)
    # mix_csv, layout b: everything done but one failure and one task whose image is missing.
    items = [make_item(t[i], "ok") for i in tasks if i not in (1, 2960)]
    items.append(make_item(t[2960], ERROR_PREDICTIONS["oom_image"]))
    write_result_file(tree / "qwen3vl_default_pic" / "mix_csv" / "results.json", "b", Config.parse("x/mix_csv"), items)
    (tree / "qwen3vl_text" / "not_a_config").mkdir()
    task_list = tmp_path / "tasks.json"
    task_list.write_text(json.dumps({"queries": [
        {"id": x.id, "FileName": x.file_name, "QuestionType": x.question_type, "SubQType": x.sub_type,
         "Question": x.question, "FinalAnswer": x.reference} for x in tasks.values()]}))
    return tree, data_root, task_list, tasks


def test_every_kind_of_gap_in_every_layout(gappy_tree):
    tree, data_root, task_list, tasks = gappy_tree
    result = run_cli("scan", tree, "--data-root", data_root, "--tasks", task_list, "--json")
    assert result.exit_code == 0, result.output
    configs = {c["config"]: c for c in json.loads(result.output)["configs"]}
    assert set(configs) == {"qwen3vl_text/text_json", "qwen3vl_resize_pic/image", "qwen3vl_default_pic/mix_csv"}

    text = configs["qwen3vl_text/text_json"]
    assert text["layout"] == "a"
    assert text["errors"] == {"oom_text": [21], "oom_image": [22], "missing_input": [23, 577],
                              "format_failure": [24], "other": [25]}
    assert text["duplicates"] == [3]
    assert text["unknown_ids"] == [99999]
    assert text["absent"] == [26, 27, 28, 29, 30, 578, 580, 1638, 2960, 2961]
    # health-table09.json is missing: 577 (error) and 578, 580 (absent) can never run; 580 needs the xlsx too.
    assert text["unrunnable"] == {"577": ["json/health-table09.json"], "578": ["json/health-table09.json"],
                                  "580": ["json/health-table09.json", "tables/health-table09.xlsx"]}
    assert text["runnable"] == [21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 1638, 2960, 2961]
    assert text["success"] == 20 and text["completed"] == 26

    image = configs["qwen3vl_resize_pic/image"]
    assert image["layout"] == "c"
    assert Path(image["result_file"]).name == "results_image_merged.json"
    employment = sorted(i for i, x in tasks.items() if x.file_name == "employment-table01")
    assert sorted(int(k) for k in image["unrunnable"]) == [i for i in employment if i < 5] + [580]
    assert image["unrunnable"]["1"] == ["image/employment-table01.png"]
    assert image["unrunnable"]["580"] == ["tables/health-table09.xlsx"], "Visualization needs the xlsx"
    assert set(image["runnable"]) == {577, 578, 1638, 2960, 2961}

    mix = configs["qwen3vl_default_pic/mix_csv"]
    assert mix["layout"] == "b"
    assert mix["errors"] == {"oom_image": [2960]} and mix["absent"] == [1] and mix["runnable"] == []
    assert mix["unrunnable"] == {"1": ["image/employment-table01.png"], "2960": ["csv/society-table10_swap.csv"]}


def test_fail_on_gaps_exit_code(gappy_tree):
    tree, data_root, task_list, _ = gappy_tree
    assert run_cli("scan", tree, "--data-root", data_root, "--tasks", task_list).exit_code == 0
    gaps = run_cli("scan", tree, "--data-root", data_root, "--tasks", task_list, "--fail-on-gaps")
    assert gaps.exit_code == EXIT_GAPS
    clean = run_cli("scan", tree, "--data-root", data_root, "--tasks", task_list, "--fail-on-gaps",
                    "--config", "qwen3vl_default_pic/mix_csv")
    assert clean.exit_code == 0, "2960 cannot run: no runnable gap in mix_csv"


def test_readable_table_names_configs_and_gaps(gappy_tree):
    tree, data_root, task_list, _ = gappy_tree
    result = run_cli("scan", tree, "--data-root", data_root, "--tasks", task_list)
    assert "qwen3vl_text/text_json" in result.output
    assert "oom_text 1" in result.output
    assert "missing source files: json/health-table09.json" in result.output
    assert "ids not in the task list: 99999" in result.output


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"config": {}, "results": [{"id": 1,}]}', r"not valid JSON \(line 1, column 37"),
        ('{"rows": []}', "unknown result layout"),
        ('{"config": {}, "results": [{"id": 1}, {"FileName": "x"}]}', r"results\[1\] has no integer 'id'"),
    ],
)
def test_bad_file_is_named_and_others_still_reported(gappy_tree, content, message):
    tree, data_root, task_list, _ = gappy_tree
    bad = tree / "qwen3vl_default_pic" / "mix_csv" / "results.json"
    bad.write_text(content)
    result = CliRunner().invoke(main, ["scan", str(tree), "--data-root", str(data_root), "--tasks", str(task_list),
                                       "--write-reports"])
    assert result.exit_code == EXIT_BAD_INPUT
    assert str(bad) in result.stderr
    assert re.search(message, result.stderr), result.stderr
    assert "qwen3vl_text/text_json" in result.stdout, "the other configurations are still reported"
    assert (tree / "qwen3vl_text" / "text_json" / "skip_ids.json").exists()
    assert not (bad.parent / "skip_ids.json").exists(), "nothing is written for the bad configuration"
    assert bad.read_text() == content, "the bad file is never touched"


@pytest.mark.parametrize(
    "content, message",
    [("[1, 2]", r'must be \{"queries": \[...\]\}'),
     ('{"queries": [{"FileName": "a"}]}', r"queries\[0\] has no integer 'id'"),
     ("{oops", "not valid JSON")],
)
def test_bad_task_list(tmp_path, content, message):
    tasks = tmp_path / "tasks.json"
    tasks.write_text(content)
    result = CliRunner().invoke(main, ["scan", str(tmp_path), "--data-root", str(tmp_path), "--tasks", str(tasks)])
    assert result.exit_code == EXIT_BAD_INPUT
    assert str(tasks) in result.stderr
    assert re.search(message, result.stderr)


def test_run_directory_answers_count(mini_data_root):
    """The users' own text_html rerun (truncated prompts) fills the OOM errors of the compiled file."""
    run_dir = MINI / "results" / "rerun-text_html-truncate"
    result = run_cli("scan", COMPILED, "--data-root", mini_data_root, "--tasks", MINI / "QA_mini.json",
                     "--run-dir", run_dir, "--config", "qwen3vl_text/text_html", "--json")
    (config,) = json.loads(result.output)["configs"]
    assert config["errors"] == {}, "2747-2749 were answered in the rerun"
    assert config["sources"] == [str(COMPILED / "qwen3vl_text/text_html/results.json"),
                                 str(run_dir / "results_20260131_201047.json"), str(run_dir / "checkpoint.json")]
    without = run_cli("scan", COMPILED, "--data-root", mini_data_root, "--tasks", MINI / "QA_mini.json",
                      "--config", "qwen3vl_text/text_html", "--json")
    assert json.loads(without.output)["configs"][0]["errors"] == {"oom_text": [2747, 2748, 2749]}


def test_ambiguous_run_directory_asks_for_its_config(tmp_path, mini_data_root):
    run_dir = tmp_path / "run"
    shutil.copytree(MINI / "results" / "rerun-text_html-truncate", run_dir)
    (run_dir / "checkpoint.json").unlink()
    data = json.loads((run_dir / "results_20260131_201047.json").read_text())
    data["config"].update(modality="mix", format="csv")
    (run_dir / "results_20260131_201047.json").write_text(json.dumps(data))
    tree = tmp_path / "tree"
    for variant in ("qwen3vl_default_pic", "qwen3vl_resize_pic"):
        shutil.copytree(COMPILED / "qwen3vl_resize_pic" / "mix_csv", tree / variant / "mix_csv")
    result = CliRunner().invoke(main, ["scan", str(tree), "--data-root", str(mini_data_root),
                                       "--tasks", str(MINI / "QA_mini.json"), "--run-dir", str(run_dir)])
    assert result.exit_code == EXIT_BAD_INPUT
    assert f"--run-dir {run_dir}=<variant>/<modality_format>" in result.stderr
    named = run_cli("scan", tree, "--data-root", mini_data_root, "--tasks", MINI / "QA_mini.json",
                    "--run-dir", f"{run_dir}=qwen3vl_resize_pic/mix_csv")
    assert named.exit_code == 0


@pytest.mark.parametrize("prediction, modality, expected", [
    ("[ERROR] OOM: Text too large (261,568 tokens)", "text", "oom_text"),
    ("[ERROR] OOM: Image too large ((7016, 4961))", "mix", "oom_image"),
    ("[ERROR] File not found: /x/image/a.png", "image", "missing_input"),
    ("[ERROR] Failed to get proper final answer format", "text", "format_failure"),
    ("[ERROR] Failed after 3 retries: CUDA out of memory. Tried to allocate 2.00 GiB", "image", "oom_image"),
    ("[ERROR] Failed after 3 retries: CUDA out of memory. Tried to allocate 2.00 GiB", "text", "oom_text"),
    ("[ERROR] Image size (233237016 pixels) exceeds limit: DecompressionBombError", "image", "oom_image"),
    ("[ERROR] Generation timed out after 600 s", "text", "timeout"),
    ("[ERROR] KeyError('x')", "text", "other"),
])
def test_error_classes(prediction, modality, expected):
    assert classify_error(prediction, modality) == expected


def test_project_file_names_configs_runs_and_variants(tmp_path, mini_data_root):
    """A project file replaces the command-line paths, adds an oddly placed file and a run directory."""
    elsewhere = tmp_path / "old" / "text_html_final.json"
    elsewhere.parent.mkdir()
    shutil.copy(COMPILED / "qwen3vl_text" / "text_html" / "results.json", elsewhere)
    project = tmp_path / "hpc-rerun.toml"
    project.write_text(f"""
results_root = "{tmp_path / 'empty'}"
data_root = "{mini_data_root}"
tasks = "{MINI / 'QA_mini.json'}"
[variants.my_small_pic]
min_pixels = 3136
max_pixels = 50176
[configs]
"qwen3vl_text/text_html" = "old/text_html_final.json"
"my_small_pic/image" = "{COMPILED / 'qwen3vl_resize_pic' / 'image' / 'results.json'}"
[runs]
"{MINI / 'results' / 'rerun-text_html-truncate'}" = "qwen3vl_text/text_html"
""")
    (tmp_path / "empty").mkdir()
    result = run_cli("scan", "--project", project, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    configs = {c["config"]: c for c in out["configs"]}
    assert set(configs) == {"qwen3vl_text/text_html", "my_small_pic/image"}
    assert configs["qwen3vl_text/text_html"]["result_file"] == str(elsewhere)
    assert configs["qwen3vl_text/text_html"]["errors"] == {}, "the run directory's answers count"
    assert out["variants"]["my_small_pic"] == {"name": "my_small_pic", "min_pixels": 3136, "max_pixels": 50176}
    assert out["variants"]["qwen3vl_text"] == {"name": "qwen3vl_text", "min_pixels": None, "max_pixels": None}


def test_project_file_with_a_typo_is_named(tmp_path):
    project = tmp_path / "hpc-rerun.toml"
    project.write_text('data_rot = "data"\n')
    result = CliRunner().invoke(main, ["scan", "--project", str(project)])
    assert result.exit_code == EXIT_BAD_INPUT
    assert "unknown key(s) data_rot" in result.stderr and str(project) in result.stderr
