"""merge-shards: answers go into the existing files; nothing is lost, even when killed at any instant."""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from hpc_rerun.benchmark import Config, load_tasks
from hpc_rerun.cli import EXIT_BAD_INPUT, main
from hpc_rerun.rundir import RecordWriter
from hpc_rerun.synthetic import ERROR_PREDICTIONS, make_item, write_result_file

from .trees import write_data_root

MINI = Path(__file__).parent / "fixtures" / "realhitbench-mini"
TASKS = MINI / "QA_final_sc_filled.json"


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def load(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture
def mini_results(tmp_path) -> Path:
    target = tmp_path / "results"
    shutil.copytree(MINI / "results", target)
    return target


def test_users_rerun_replaces_the_oom_errors_of_text_html(mini_results):
    """Done-when of the issue: the real truncated rerun merged into the real text_html file."""
    target = mini_results / "complied" / "qwen3vl_text" / "text_html" / "results.json"
    original_bytes = target.read_bytes()
    original = load(target)
    rerun = {i["id"]: i for i in load(mini_results / "rerun-text_html-truncate" / "results_20260131_201047.json")[
        "results"]}
    result = run_cli("merge-shards", "--into", mini_results / "complied",
                     "--from", mini_results / "rerun-text_html-truncate")
    assert result.exit_code == 0, result.output
    merged = load(target)
    assert list(merged) == list(original), "same top-level layout and key order"
    assert merged["config"] == original["config"]
    assert list(merged["aggregate_metrics"]) == ["by_question_type", "overall"]
    ids = [i["id"] for i in merged["results"]]
    assert ids == sorted(ids) and len(ids) == len(set(ids))
    by_id = {i["id"]: i for i in merged["results"]}
    for task_id in (2747, 2748, 2749):
        assert by_id[task_id]["Prediction"] == rerun[task_id]["Prediction"]
        assert not by_id[task_id]["Prediction"].startswith("[ERROR]")
        assert Path(by_id[task_id]["provenance"]["source"]).parent.name == "rerun-text_html-truncate"
    # The excerpt's aggregates are those of the users' whole 3,071-item file: no rule gives them back from
    # these 31 items, so the merge leaves them as they were and says so ...
    assert merged["aggregate_metrics"] == original["aggregate_metrics"]
    assert "aggregate_metrics left as they were: no rule gives the stored aggregate_metrics back" in result.output
    assert "--recompute-aggregates" in result.output
    # ... and rewrites them when told to: the means of the merged items (computed here on their own), and
    # the group whose OOM items were replaced changed.
    result = run_cli("merge-shards", "--into", mini_results / "complied", "--from",
                     mini_results / "rerun-text_html-truncate", "--recompute-aggregates")
    assert result.exit_code == 0, result.output
    merged = load(target)
    by_type = merged["aggregate_metrics"]["by_question_type"]
    for question_type, group in by_type.items():
        items = [i for i in merged["results"] if i["QuestionType"] == question_type]
        for metric in ("F1", "EM", "ROUGE-L", "SacreBLEU"):
            values = [i["Metrics"][metric] for i in items if isinstance(i["Metrics"].get(metric), (int, float))]
            if metric in group and values:
                assert group[metric] == pytest.approx(sum(values) / len(values), abs=0.006), (question_type, metric)
    changed_type = by_id[2747]["QuestionType"]
    assert by_type[changed_type] != original["aggregate_metrics"]["by_question_type"][changed_type]
    for item in original["results"]:
        if item["id"] not in (2747, 2748, 2749):
            assert by_id[item["id"]] == item, "every other item is unchanged"
    backups = sorted(target.parent.glob("results.json.bak-*"))  # one per merge that wrote, none overwritten
    assert len(backups) == 2 and backups[0].read_bytes() == original_bytes
    # Idempotent: a second merge changes no byte and makes no second backup.
    after_first = target.read_bytes()
    again = run_cli("merge-shards", "--into", mini_results / "complied",
                    "--from", mini_results / "rerun-text_html-truncate")
    assert again.exit_code == 0 and target.read_bytes() == after_first
    assert len(list(target.parent.glob("results.json.bak-*"))) == 2


@pytest.fixture
def run_tree(tmp_path):
    """A results tree in the three layouts (one with a checkpoint), and a run with two attempts."""
    tasks = load_tasks(TASKS)
    ids = list(range(1, 13))
    t = {i: tasks[i] for i in ids}
    root = tmp_path / "results"
    files = {}
    layouts = {"qwen3vl_text/text_csv": "a", "qwen3vl_resize_pic/image": "b", "qwen3vl_default_pic/mix_json": "c"}
    for name, layout in layouts.items():
        items = [make_item(t[i], f"old answer {i}") for i in ids if i not in (3, 4)]  # 3, 4 absent
        items[0] = make_item(t[1], ERROR_PREDICTIONS["oom_text"])  # 1 failed
        items[1] = make_item(t[2], ERROR_PREDICTIONS["other"])  # 2 failed
        items.reverse()  # not sorted
        files[name] = write_result_file(root / name / "results.json", layout, Config.parse(name), items)
    files["qwen3vl_resize_pic/image"].with_name("checkpoint.json").write_text(json.dumps({"results": [],
                                                                                         "processed_ids": []}))
    data_root = write_data_root(tmp_path / "data", t)
    run_dir = tmp_path / "logs" / "run1"

    def shard(attempt: int, shard_no: int, entries: list[tuple[str, int, str]]):
        path = run_dir / f"attempt-{attempt}" / f"shard-{shard_no:04d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with RecordWriter(path) as writer:
            for config, task_id, prediction in entries:
                item = make_item(t[task_id], prediction)
                item["provenance"] = {"config": config, "run_id": "run1", "attempt": attempt, "shard": shard_no}
                writer.append(item)

    for name in layouts:
        shard(1, 0, [(name, 1, "first try"), (name, 2, ERROR_PREDICTIONS["oom_text"]), (name, 3, "three"),
                     (name, 5, "better answer 5")])
        shard(2, 0, [(name, 1, "second try"), (name, 2, ERROR_PREDICTIONS["format_failure"]),
                     (name, 4, ERROR_PREDICTIONS["oom_image"]), (name, 3, ERROR_PREDICTIONS["other"])])
    task_list = tmp_path / "tasks.json"
    task_list.write_text(json.dumps({"queries": [q for q in load(TASKS)["queries"] if q["id"] in t]}))
    plan = {"results_root": str(root), "data_root": str(data_root), "task_list": str(task_list),
            "result_files": {n: {"path": str(p), "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
                             for n, p in files.items()}}
    (run_dir / "plan.json").write_text(json.dumps(plan))
    return run_dir, root, files


def test_best_record_per_task_in_every_layout(run_tree):
    run_dir, root, files = run_tree
    before = {n: load(p) for n, p in files.items()}
    result = run_cli("merge-shards", run_dir)
    assert result.exit_code == 0, result.output
    for name, path in files.items():
        merged = load(path)
        assert list(merged) == list(before[name]), f"{name}: layout kept"
        by_id = {i["id"]: i for i in merged["results"]}
        assert [i["id"] for i in merged["results"]] == list(range(1, 13))
        assert by_id[1]["Prediction"] == "second try", "newer attempt over older"
        assert by_id[2]["Prediction"] == ERROR_PREDICTIONS["format_failure"], "an error replaced by the newest error"
        assert by_id[3]["Prediction"] == "three", "success over a newer error"
        assert by_id[4]["Prediction"] == ERROR_PREDICTIONS["oom_image"], "absent id inserted, even as an error"
        assert by_id[5]["Prediction"] == "old answer 5", "an existing success is never replaced by default"
        assert by_id[1]["provenance"] == {"config": name, "run_id": "run1", "attempt": 2, "shard": 0}
        assert "provenance" not in by_id[5]
        assert list(by_id[1])[:9] == ["id", "FileName", "QuestionType", "SubQType", "Question", "Reference",
                                      "Prediction", "Metrics", "ProcessingTime"]
    checkpoint = load(files["qwen3vl_resize_pic/image"].with_name("checkpoint.json"))
    assert checkpoint["processed_ids"] == [1, 3, 5, 6, 7, 8, 9, 10, 11, 12]
    assert [i["id"] for i in checkpoint["results"]] == list(range(1, 13))
    skip = load(files["qwen3vl_text/text_csv"].with_name("skip_ids.json"))
    assert skip["error_ids"] == [2, 4] and skip["skip_ids"] == []
    assert "scan of" in result.output, "the merge scans the tree again and shows what is left"
    assert not files["qwen3vl_text/text_csv"].with_name("checkpoint.json").exists(), "no checkpoint invented"


def test_overwrite_and_no_provenance(run_tree):
    run_dir, _, files = run_tree
    assert run_cli("merge-shards", run_dir, "--overwrite", "--no-provenance").exit_code == 0
    by_id = {i["id"]: i for i in load(files["qwen3vl_text/text_csv"])["results"]}
    assert by_id[5]["Prediction"] == "better answer 5"
    assert all("provenance" not in i for i in by_id.values())


def test_dry_run_writes_nothing(run_tree):
    run_dir, root, files = run_tree
    snapshot = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    result = run_cli("merge-shards", run_dir, "--dry-run")
    assert result.exit_code == 0 and "would change" in result.output
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == snapshot


def test_bad_or_changed_files_are_left_alone(run_tree):
    run_dir, _, files = run_tree
    broken = files["qwen3vl_resize_pic/image"]
    broken.write_text('{"config": {}, "results": [')
    changed = files["qwen3vl_default_pic/mix_json"]
    data = load(changed)
    data["results"][0]["Prediction"] = "edited by hand after planning"
    changed.write_text(json.dumps(data, indent=2))
    changed_bytes = changed.read_bytes()
    result = CliRunner().invoke(main, ["merge-shards", str(run_dir)])
    assert result.exit_code == EXIT_BAD_INPUT
    assert f"{broken}: not valid JSON" in result.stderr
    assert f"{changed}: changed since the run was planned" in result.stderr and "--force" in result.stderr
    assert broken.read_text() == '{"config": {}, "results": ['
    assert changed.read_bytes() == changed_bytes
    assert not list(changed.parent.glob("*.bak-*"))
    assert {i["id"]: i for i in load(files["qwen3vl_text/text_csv"])["results"]}[1]["Prediction"] == "second try"
    forced = CliRunner().invoke(main, ["merge-shards", str(run_dir), "--force"])
    assert {i["id"]: i for i in load(changed)["results"]}[1]["Prediction"] == "second try"
    assert forced.exit_code == EXIT_BAD_INPUT, "the broken file is still reported"


def test_a_second_merge_at_once_is_refused(run_tree):
    run_dir, root, files = run_tree
    with open(root / ".hpc-rerun.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        result = CliRunner().invoke(main, ["merge-shards", str(run_dir)])
    assert result.exit_code == EXIT_BAD_INPUT and "another merge is running" in result.stderr
    assert not list(root.rglob("*.bak-*"))


def test_killed_at_any_point_every_file_is_old_or_new_and_a_rerun_completes(run_tree, tmp_path):
    """SIGKILL at every fault point of a merge (temp half written, temp complete, renamed, backups)."""
    run_dir, root, files = run_tree
    watched = [*files.values(), files["qwen3vl_resize_pic/image"].with_name("checkpoint.json")]
    old = {p: p.read_bytes() for p in watched}
    pristine = tmp_path / "pristine"
    shutil.copytree(run_dir.parent.parent, pristine, symlinks=True)
    assert run_cli("merge-shards", run_dir).exit_code == 0
    new = {p: p.read_bytes() for p in watched}
    assert all(new[p] != old[p] for p in watched)

    def reset():
        for sub in ("results", "logs", "data"):
            shutil.rmtree(tmp_path / sub)
            shutil.copytree(pristine / sub, tmp_path / sub, symlinks=True)

    command = [sys.executable, "-m", "hpc_rerun.cli", "merge-shards", str(run_dir)]
    kills = 0
    for point in range(1, 200):
        reset()
        proc = subprocess.run([sys.executable, "-m", "tests.faults", str(point), *command[2:]], capture_output=True,
                              cwd=Path(__file__).resolve().parent.parent)
        if proc.returncode == 0:
            break  # fewer fault points than this: the merge ran to the end
        assert proc.returncode == -9, proc.stderr.decode()
        kills += 1
        for path in watched:
            assert path.read_bytes() in (old[path], new[path]), f"kill at point {point}: {path} is torn"
        rerun = subprocess.run(command, capture_output=True)
        assert rerun.returncode == 0, f"rerun after kill at point {point}: {rerun.stderr.decode()}"
        for path in watched:
            assert path.read_bytes() == new[path], f"kill at point {point}: rerun did not complete {path}"
    assert kills >= 20, f"only {kills} fault points"
