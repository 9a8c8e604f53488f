"""The users' answer protocol in the worker: every response shape ends as the script that made a configuration
stored it, format re-asks run in the packed engine's later batches, and batches answer as one by one.

CPU, fp32, tiny Qwen3-VLs set to reply a fixed text (``build_tiny_qwen3vl(answer=...)``), with
Qwen3-VL-8B-Instruct's generation_config (sampling: temperature 0.7, top-p 0.8, top-k 20, repetition_penalty
1.0, its two end tokens): a fixed reply is the one token of its nucleus at every step, so sampling gives it
whatever the batch, and a response shape is chosen by the model's weights, not by a stub.
"""

from __future__ import annotations

import pytest

from hpc_rerun.benchmark import load_tasks
from hpc_rerun.inference import worker as worker_module
from hpc_rerun.inference.engine import Engine
from hpc_rerun.inference.tinymodel import build_tiny_qwen3vl
from hpc_rerun.protocol import BATCH_NOTE, FORMAT_ERROR, PRESETS, SEQUENTIAL_NOTE, preset, protocol_for
from hpc_rerun.scoring.metrics import score_answer
from tests.test_worker import TASKS, data_root, make_spec, records_by_key  # noqa: F401 - data_root: a fixture

# One configuration per preset; text_markdown has none in the spec: hpc-rerun's own (as specs before protocols).
PROTOCOL_OF = {"qwen3vl_text/text_csv": "truncate", "qwen3vl_text/text_json": "default-sequential",
               "qwen3vl_text/text_latex": "default-batch"}
CONFIGS = [*PROTOCOL_OF, "qwen3vl_text/text_markdown"]
SAMPLED = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "max_new_tokens": 16}
# employment-table01: two Fact Checking tasks, and a Summary Analysis one (their batch loop left it to the
# sequential loop)
IDS = [2, 3, 6]
SHAPES = {  # the reply -> (Prediction, generations) per preset: truncate, default-sequential, default-batch, ours
    "marker": ("Sum: [Final Answer]: 1954", [("1954", 1)] * 4),
    "plain marker": ("Final Answer: 1954", [("1954", 1)] * 3 + [(FORMAT_ERROR, 1)]),
    "no marker": ("I am not sure", [(FORMAT_ERROR, 3), ("I am not sure", 3), ("I am not sure", 3), (FORMAT_ERROR, 1)]),
    "empty": ("", [(FORMAT_ERROR, 3), ("", 3), ("", 3), (FORMAT_ERROR, 1)]),
}


@pytest.fixture(scope="module")
def replying_model(tmp_path_factory):
    """A tiny model per reply, built once."""
    built = {}

    def model(reply: str):
        if reply not in built:
            built[reply] = build_tiny_qwen3vl(tmp_path_factory.mktemp("replying"), answer=reply)
        return built[reply]

    return model


@pytest.fixture
def batches(monkeypatch):
    """What each generate call of the worker held: (config, id, prompt text, prompt tokens) per task."""
    seen = []
    run_batch = worker_module.ShardRunner.run_batch

    def recording(self, batch, writer):
        seen.append([(ti.config.name, ti.task.id, ti.request.text, ti.request.prompt_tokens) for ti in batch])
        return run_batch(self, batch, writer)

    monkeypatch.setattr(worker_module.ShardRunner, "run_batch", recording)
    return seen


@pytest.mark.parametrize("shape", SHAPES)
def test_each_response_shape_is_stored_as_its_script_stored_it(tmp_path, data_root,  # noqa: F811
                                                                replying_model, batches, shape):
    reply, expected = SHAPES[shape]
    tasks = [(config, task_id) for config in CONFIGS for task_id in IDS]
    spec = make_spec(tmp_path, replying_model(reply), data_root, tasks, generation=SAMPLED, token_budget=3000,
                     answer_protocols=PROTOCOL_OF)
    worker_module.run_shard(spec)
    records = records_by_key(spec)
    by_task = load_tasks(TASKS)
    for config, (prediction, generations) in zip(CONFIGS, expected):
        for task_id in IDS:
            record = records[(config, task_id)]
            provenance = record["provenance"]
            assert (record["Prediction"], provenance["generations"]) == (prediction, generations), (config, task_id)
            name = PROTOCOL_OF.get(config, "hpc-rerun")
            if task_id == 6 and name == "default-batch":
                name = "default-sequential"  # their batch loop answered Summary Analysis one by one
            assert provenance["answer_protocol"] == name
            assert provenance["max_input_tokens"] is None and provenance["table_bytes_dropped"] == 0
            if name == "hpc-rerun" and prediction == FORMAT_ERROR:  # ours: an error record, never scored
                assert provenance["error_class"] == "format_failure"
                assert record["Metrics"] == worker_module.error_metrics(by_task[task_id])
            else:  # theirs: whatever was kept is scored as a prediction, the error text included
                assert record["Metrics"] == score_answer(by_task[task_id], prediction, data_root).metrics
                assert provenance["error_class"] == ("format_failure" if prediction == FORMAT_ERROR else None)
    # every re-ask is the first message with its script's note, in a later batch than the ask before it
    first_ask = {}
    for number, batch in enumerate(batches):
        for config, task_id, text, tokens in batch:
            assert tokens <= 3000
            asked = first_ask.setdefault((config, task_id), (number, text))
            if asked[0] != number:
                note = (SEQUENTIAL_NOTE if PROTOCOL_OF[config] != "default-batch" or task_id == 6 else BATCH_NOTE)
                assert text == asked[1] + note.replace("{answer_format}", "AnswerName1, AnswerName2...")
    asks = [len(batch) for batch in batches]
    assert sum(asks) == sum(generations for _, generations in expected) * len(IDS)


def test_reasks_in_batches_answer_as_one_by_one(tmp_path, data_root, replying_model, batches):  # noqa: F811
    """Tasks that never write a marker, run packed (re-asks join later batches) and one task per batch: the same
    records, 3 generations each, the table cut leaving room for the note (the re-ask keeps the same cut and
    the budget)."""
    tasks = [(config, task_id) for config in PROTOCOL_OF for task_id in (2, 3, 4)]
    records = []
    for batch_tokens in (None, 1):
        spec = make_spec(tmp_path / str(batch_tokens), replying_model("I am not sure"), data_root, tasks,
                         generation=SAMPLED, token_budget=2000, batch_tokens=batch_tokens, answer_protocols=PROTOCOL_OF)
        runner = worker_module.ShardRunner(spec)
        runner.run()
        assert runner.tables.builds == len(PROTOCOL_OF), "each table tokenised once, its re-asks included"
        records.append({key: (r["Prediction"], r["Metrics"], r["provenance"]["generations"],
                              r["provenance"]["truncated_to_tokens"], r["provenance"]["truncation"])
                        for key, r in records_by_key(spec).items()})
    packed, one_by_one = records
    assert packed == one_by_one
    assert {generations for _, _, generations, _, _ in packed.values()} == {3}
    assert all(truncation for _, _, _, _, truncation in packed.values()), "the tables were cut to fit"
    packed_batches = batches[:len(batches) - 3 * len(tasks)]
    assert [len(b) for b in packed_batches] == [len(tasks)] * 3, "asks, then re-asks, then third asks"
    assert all(len(b) == 1 for b in batches[len(packed_batches):])
    for ask, again in zip(packed_batches[0], packed_batches[1]):
        assert again[2].startswith(ask[2]) and len(again[2]) > len(ask[2]), "the same cut, then the note"
        assert again[3] <= 2000


def test_the_users_truncation_rule_is_recorded_on_the_spec_and_the_item(tmp_path, data_root,  # noqa: F811
                                                                        replying_model):
    spec = make_spec(tmp_path, replying_model("Sum: [Final Answer]: 1954"), data_root,
                     [("qwen3vl_text/text_latex", 2)], generation=SAMPLED, max_input_tokens=1500,
                     answer_protocols=PROTOCOL_OF)
    assert worker_module.ShardSpec.read(spec).max_input_tokens == 1500
    worker_module.run_shard(spec)
    (record,) = records_by_key(spec).values()
    assert record["provenance"]["max_input_tokens"] == 1500
    assert record["provenance"]["truncation"]["rule"] == "users"


def test_none_then_compliant_is_the_second_answer(tmp_path, data_root, tiny_model_dir, monkeypatch):  # noqa: F811
    """A reply that changes between asks cannot come from a fixed-reply tiny model, so this one test gives the
    engine's decoded text from a script (the model still runs; its prompts are the real re-asks): the second
    reply's answer is kept, after 2 generations, by every preset that re-asks."""
    replies = {}

    def scripted(self, encoded):
        real = Engine.generate_ids(self, encoded)  # the real forward passes, then the scripted text
        out = []
        for _ in real:
            key = len(replies)
            replies[key] = "Let me look at the table." if key < 3 else "Some words. Final Answer: 1953 "
            out.append(replies[key])
        return out

    monkeypatch.setattr(Engine, "generate_encoded", scripted)
    tasks = [(config, 3) for config in PROTOCOL_OF]
    spec = make_spec(tmp_path, tiny_model_dir, data_root, tasks, generation=SAMPLED, token_budget=2000,
                     answer_protocols=PROTOCOL_OF)
    worker_module.run_shard(spec)
    for key, record in records_by_key(spec).items():
        assert (record["Prediction"], record["provenance"]["generations"]) == ("1953", 2), key


def test_presets_and_their_choice_per_configuration():
    """The notes as written in the users' scripts, and a configuration's own entry over its variant's."""
    assert SEQUENTIAL_NOTE.endswith('"[Final Answer]: {answer_format}') and BATCH_NOTE.endswith('}"')
    assert preset("default-batch").for_task("Visualization", "LineChart Generation").name == "default-sequential"
    assert preset("default-batch").for_task("Data Analysis", "Anomaly Analysis").name == "default-sequential"
    assert preset("default-batch").for_task("Fact Checking", "Value-Matching").name == "default-batch"
    choices = {"qwen3vl_text": "truncate", "qwen3vl_text/text_latex": "default-batch"}
    assert protocol_for("qwen3vl_text/text_latex", choices) == "default-batch"
    assert protocol_for("qwen3vl_text/text_csv", choices) == "truncate"
    assert protocol_for("qwen3vl_default_pic/image", choices) == "default-sequential"
    assert protocol_for("qwen3vl_text/text_csv", {}) == "default-batch", "the batch loop made text_csv"
    assert {p.generations for p in PRESETS.values()} == {1, 3}
    # the text after the LAST marker, stripped; the bracketed one first
    assert preset("truncate").extract("Final Answer: a [Final Answer]: b \n Final Answer: c") == "b \n Final Answer: c"


def test_plan_records_each_configurations_protocol_and_the_truncation_rule_in_every_spec(tmp_path, gappy_benchmark,
                                                                                         tiny_model_dir):
    """The project file's [protocols] (a configuration's own entry over its variant's) and --max-input-tokens
    reach every shard spec; a name that is not a preset is an error naming the file and the presets."""
    from tests.test_runs import cli

    project = tmp_path / "hpc-rerun.toml"
    project.write_text('[protocols]\nqwen3vl_text = "truncate"\n"qwen3vl_text/text_csv" = "default-batch"\n')
    args = ["plan", gappy_benchmark["results"], "--data-root", gappy_benchmark["data"], "--tasks",
            gappy_benchmark["tasks"], "--model", tiny_model_dir, "--shards", 2, "--logs", gappy_benchmark["logs"],
            "--project", project, "--max-input-tokens", 200000]
    cli(*args)
    (run_dir,) = gappy_benchmark["logs"].iterdir()
    specs = sorted(run_dir.glob("attempt-1/shard-*.json"))
    assert len(specs) == 2
    for path in specs:
        spec = worker_module.ShardSpec.read(path)
        assert spec.answer_protocols == {"qwen3vl_text/text_json": "truncate"} and spec.max_input_tokens == 200000
    project.write_text('[protocols]\nqwen3vl_text = "sequential"\n')
    proc = cli(*args, check=False)
    assert proc.returncode == 3 and str(project) in proc.stderr and "default-sequential" in proc.stderr, proc.stderr


def test_a_spec_written_before_protocols_still_reads_and_keeps_its_meaning(tmp_path, data_root):  # noqa: F811
    """Specs of runs planned before these settings have neither key: they ran hpc-rerun's own protocol and cut."""
    import json

    spec = make_spec(tmp_path, "model", data_root, [("qwen3vl_text/text_csv", 2)])
    data = json.loads(spec.read_text())
    del data["answer_protocols"], data["max_input_tokens"]
    spec.write_text(json.dumps(data))
    read = worker_module.ShardSpec.read(spec)
    assert read.answer_protocols == {} and read.max_input_tokens is None  # the worker: hpc-rerun's (shape test)
