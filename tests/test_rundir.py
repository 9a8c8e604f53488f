"""The run directory as typed records: what the previous version wrote (tests/fixtures/run-before-typed: its
plan.json, a shard spec and a shard file with a torn last line, written by that version's own RunDir, ShardSpec
and RecordWriter) reads as Plan / Attempt / ShardEntry / ShardSpec / Record, and goes back to the same bytes;
keys this version does not declare (other versions' provenance) are kept, not dropped."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hpc_rerun.atomic import dump_json
from hpc_rerun.backends.slurm import SlurmOptions
from hpc_rerun.benchmark import BenchmarkError
from hpc_rerun.generation import Generation
from hpc_rerun.rundir import Record, RecordWriter, RunDir, ShardSpec, best_records, load_records, read_records

from .test_runs import cli

OLD_RUN = Path(__file__).parent / "fixtures" / "run-before-typed"


@pytest.fixture
def old_run(tmp_path) -> RunDir:
    shutil.copytree(OLD_RUN, tmp_path / "run")
    return RunDir.open(tmp_path / "run")


def test_an_old_plan_reads_typed_and_saves_back_byte_for_byte(old_run):
    before = old_run.plan_path.read_bytes()
    plan = old_run.plan()
    assert (plan.run_id, plan.results_root, plan.settings["model"]) == (
        "20261201-100000-ab12", "/data/result/complied", "/models/Qwen3-VL-8B-Instruct")
    assert plan.planned_hashes() == {"qwen3vl_text/text_json": "0" * 64}
    (attempt,) = plan.attempts
    assert (attempt.number, attempt.executor, attempt.jobs, attempt.job_name) == (
        1, "slurm", {"0": "4242_0"}, "hpc-rerun-20261201-100000-ab12")
    assert attempt.submitted_at is not None and attempt.folder == old_run.path / "attempt-1"
    (shard,) = attempt.shards
    assert (shard.number, shard.tasks, shard.cost_s, shard.configs) == (0, 2, 12.5, ["qwen3vl_text/text_json"])
    assert SlurmOptions.from_dict(attempt.slurm).extra_sbatch == {"constraint": "a100_80gb"}
    old_run.save(plan)
    assert old_run.plan_path.read_bytes() == before, "reading and saving changed plan.json"


def test_an_old_shard_spec_reads_with_its_generation_settings_and_writes_back_its_keys(old_run):
    path = old_run.path / "attempt-1" / "shard-0000.json"
    spec = ShardSpec.read(path)
    assert spec.generation == Generation.sampled(4096)
    assert spec.generation.hf_kwargs() == {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20,
                                           "max_new_tokens": 4096}
    assert spec.tasks[1] == {"config": "qwen3vl_text/text_json", "id": 1957, "token_budget": 65536}
    before = json.loads(path.read_bytes())
    spec.write(old_run)
    after = json.loads(path.read_bytes())
    assert list(after)[:len(before)] == list(before), "the old keys first, in their order (new settings after)"
    assert {k: after[k] for k in before} == before


def test_old_records_read_typed_past_a_torn_line_and_go_back_to_the_same_json(old_run):
    path = old_run.path / "attempt-1" / "shard-0000.jsonl"
    raw = read_records(path)
    records = load_records(path)
    assert len(records) == len(raw) == 2, "the torn last line is not a record"
    error, success = records
    assert error.key == ("qwen3vl_text/text_json", 1957) and not error.ok
    assert error.provenance.error_class == "oom_text" and error.provenance.truncated_to_tokens == 65536
    assert error.provenance.truncation == {"rule": "rows", "kept_rows": 310}
    assert success.ok and success.provenance.host == "gpu017" and success.question_type == "Fact Checking"
    for record, data in zip(records, raw):
        assert json.dumps(record.to_dict()) == json.dumps(data), "key order or values changed"
    best = old_run.snapshot().best()
    assert best[("qwen3vl_text/text_json", 1634)] is not None and not best[("qwen3vl_text/text_json", 1957)].ok


def test_provenance_keys_of_other_versions_round_trip(tmp_path):
    """Keys declared for the worker's newer fields and keys no version here knows both come back unchanged."""
    data = {"id": 7, "Prediction": "[Final Answer]: 3", "Metrics": {"EM": 100.0}, "an_item_key_from_later": [1],
            "provenance": {"config": "v/text_csv", "attempt": 2, "answer_protocol": {"extract": "final_answer"},
                           "generations": ["3"], "table_bytes_dropped": 1024, "sandbox_layer": "bwrap",
                           "image_shrunk_for_budget": None, "added_by_a_later_version": {"x": 1}}}
    record = Record.from_dict(data)
    assert record.provenance.table_bytes_dropped == 1024 and record.provenance.sandbox_layer == "bwrap"
    assert record.provenance.extra == {"added_by_a_later_version": {"x": 1}}
    assert record.extra == {"an_item_key_from_later": [1]}
    assert dump_json(record.to_dict()) == dump_json(data)
    with RecordWriter(tmp_path / "shard.jsonl") as writer:
        writer.append(record)
    assert read_records(tmp_path / "shard.jsonl") == [data]
    assert record.to_item()["provenance"] == data["provenance"], "merged items keep every provenance key"


def test_best_record_success_over_error_then_the_newest():
    def record(attempt, prediction):
        return Record.from_dict({"id": 1, "Prediction": prediction, "provenance": {"config": "c", "attempt": attempt}})

    first_ok, second_error, third_ok = record(1, "a"), record(2, "[ERROR] OOM"), record(3, "b")
    assert best_records([first_ok, second_error])[("c", 1)] is first_ok, "an error never replaces a success"
    assert best_records([first_ok, second_error, third_ok])[("c", 1)] is third_ok, "the newer success wins"
    assert best_records([second_error, record(4, "[ERROR] other")])[("c", 1)].provenance.attempt == 4


@pytest.mark.parametrize("item, says", [
    ("job-name=mine", "hpc-rerun sets --job-name itself"),
    ("J=mine", "hpc-rerun sets --J itself"),
    ("--array=0-9", "hpc-rerun sets --array itself"),
    ("output=/tmp/x.out", "hpc-rerun sets --output itself"),
    ("partition=gpu", "use --partition"),
])
def test_an_sbatch_option_the_tool_manages_is_refused(item, says):
    with pytest.raises(BenchmarkError, match=says):
        SlurmOptions.resolve({"extra_sbatch": (item,)})


def test_plan_refuses_sbatch_job_name_with_the_fix(gappy_benchmark, tiny_model_dir):
    proc = cli("plan", gappy_benchmark["results"], "--data-root", gappy_benchmark["data"], "--tasks",
               gappy_benchmark["tasks"], "--model", tiny_model_dir, "--sbatch", "job-name=mine", "--dry-run",
               check=False)
    assert proc.returncode == 2, proc.stderr
    assert "--sbatch job-name=...: hpc-rerun sets --job-name itself" in proc.stderr and "leave it out" in proc.stderr
    assert not gappy_benchmark["logs"].exists()
