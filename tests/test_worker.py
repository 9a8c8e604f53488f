"""The shard worker on the CPU with the tiny Qwen3-VL: every task ends as exactly one record."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from hpc_rerun.benchmark import load_tasks
from hpc_rerun.inference import worker as worker_module
from hpc_rerun.inference.engine import Engine, Request
from hpc_rerun.inference.engine import sampling as packed_sampling
from hpc_rerun.inference.prompts import DEFAULT_PROMPTS, build_prompt_text, load_prompt_set
from hpc_rerun.inference.worker import run_shard
from hpc_rerun.protocol import preset
from hpc_rerun.rundir import ShardSpec, read_records, records_path

from .conftest import MINI_DATA

MINI = Path(__file__).parent / "fixtures" / "realhitbench-mini"
TASKS = MINI / "QA_final_sc_filled.json"
ITEM_KEYS = ["id", "FileName", "QuestionType", "SubQType", "Question", "Reference", "Prediction", "Metrics",
             "ProcessingTime", "provenance"]
RESIZE = {"min_pixels": 256 * 28 * 28, "max_pixels": 2048 * 28 * 28}


@pytest.fixture
def data_root(tmp_path) -> Path:
    """The mini tables, plus table images rendered here (the data copy has none); labor-table68 has none."""
    root = tmp_path / "data"
    root.mkdir()
    for folder in MINI_DATA.iterdir():
        (root / folder.name).symlink_to(folder)
    (root / "image").mkdir()
    for name in ["employment-table01", "science-table32", "economy-table14", "society-table10", "science-table32_swap"]:
        Image.new("RGB", (640, 480), "white").save(root / "image" / f"{name}.png")
    return root


def make_spec(tmp_path, model, data_root, tasks, **overrides) -> Path:
    settings = dict(run_id="test", attempt=1, shard=0, model=str(model), data_root=str(data_root),
                    task_list=str(TASKS), tasks=[{"config": c, "id": i} for c, i in tasks],
                    configs={"qwen3vl_resize_pic/image": RESIZE}, generation={"do_sample": False, "max_new_tokens": 6})
    settings.update(overrides)
    return ShardSpec(**settings).write(tmp_path / "run")


def records_by_key(spec_path) -> dict:
    records = read_records(records_path(spec_path))
    keys = [(r["provenance"]["config"], r["id"]) for r in records]
    assert len(keys) == len(set(keys)), f"duplicate records: {keys}"
    return dict(zip(keys, records))


def test_text_image_mix_end_to_end(tmp_path, tiny_model_dir, data_root):
    tasks = [("qwen3vl_text/text_csv", 1), ("qwen3vl_text/text_latex", 1638), ("qwen3vl_resize_pic/image", 2),
             ("qwen3vl_default_pic/mix_markdown", 1634), ("qwen3vl_default_pic/mix_markdown", 2216),
             ("qwen3vl_text/text_csv", 438)]
    spec = make_spec(tmp_path, tiny_model_dir, data_root, tasks, token_budget=20000)
    summary = run_shard(spec)
    assert summary["written"] == len(tasks)
    records = records_by_key(spec)
    assert set(records) == set(tasks)
    for (config, _), record in records.items():
        assert list(record) == ITEM_KEYS
        provenance = record["provenance"]
        assert provenance["config"] == config and provenance["run_id"] == "test" and provenance["gpu"] == "cpu"
        assert provenance["host"] and provenance["start"] <= provenance["end"]
    # The tiny random model never writes "[Final Answer]:": the fork's format failure, with its class.
    assert records[("qwen3vl_text/text_csv", 1)]["Prediction"] == "[ERROR] Failed to get proper final answer format"
    assert records[("qwen3vl_text/text_csv", 1)]["provenance"]["error_class"] == "format_failure"
    assert records[("qwen3vl_text/text_latex", 1638)]["Metrics"] == {"ECR": False, "Pass": "None"}
    # labor-table68 has no image: a missing_input record, never a crash.
    missing = records[("qwen3vl_default_pic/mix_markdown", 2216)]
    assert missing["Prediction"].startswith("[ERROR] File not found:") and missing["Prediction"].endswith(
        "image/labor-table68.png")
    assert missing["provenance"]["error_class"] == "missing_input"
    # The resize variant's pixel cap is what the model saw; economy-table14.csv (47K tokens) was truncated.
    image = records[("qwen3vl_resize_pic/image", 2)]["provenance"]
    assert image["pixel_cap"] == RESIZE["max_pixels"] and image["image_pixels"] <= RESIZE["max_pixels"]
    csv = records[("qwen3vl_text/text_csv", 438)]["provenance"]
    assert csv["prompt_tokens"] > 20000 >= csv["truncated_to_tokens"] > 0


def test_answers_are_extracted_and_scored(tmp_path, tiny_model_dir, data_root):
    """A response with a final answer becomes a scored item (scored as the benchmark does)."""
    spec = make_spec(tmp_path, tiny_model_dir, data_root, [])
    runner = worker_module.ShardRunner(spec)
    tasks = load_tasks(TASKS)
    config = worker_module.Config.parse("qwen3vl_text/text_csv")
    ti = worker_module.TaskInput(config, tasks[1], None, None, 1000, None, None,
                                 request=Request("q", None, {}, prompt_tokens=10), protocol=preset("truncate"))
    with worker_module.RecordWriter(records_path(spec)) as writer:
        runner.write_answer(ti, "Let me look.\n[Final Answer]: 1954\n[Final Answer]: 1955, 62170", 1.0, time.time(),
                            writer)
    (record,) = read_records(records_path(spec))
    assert record["Prediction"] == "1955, 62170"
    # SacreBLEU is 0 for an exact answer under 4 words, as in the stored items (e.g. id 2750 'South East').
    assert record["Metrics"] == {"F1": 100.0, "EM": 100.0, "ROUGE-L": 100.0, "SacreBLEU": 0.0}
    assert record["provenance"]["error_class"] is None


def test_a_chart_answer_records_the_sandbox_layer_it_was_scored_under(tmp_path, tiny_model_dir, data_root):
    """A Visualization answer (the users' stored one for task 1960, Pass true) is scored in the sandbox, and its
    record says under which layer (bubblewrap here: CI installs it)."""
    spec = make_spec(tmp_path, tiny_model_dir, data_root, [])
    runner = worker_module.ShardRunner(spec)
    stored = next(i for i in json.loads((MINI / "results" / "complied" / "qwen3vl_text" / "text_json" /
                                         "results.json").read_text())["results"] if i["id"] == 1960)
    config = worker_module.Config.parse("qwen3vl_text/text_json")
    ti = worker_module.TaskInput(config, load_tasks(TASKS)[1960], None, None, 1000, None, None,
                                 request=Request("q", None, {}, prompt_tokens=10), protocol=preset("truncate"))
    with worker_module.RecordWriter(records_path(spec)) as writer:
        runner.write_answer(ti, f"[Final Answer]: {stored['Prediction']}", 1.0, time.time(), writer)
    (record,) = read_records(records_path(spec))
    assert record["Metrics"] == stored["Metrics"] == {"ECR": True, "Pass": True}
    assert record["provenance"]["sandbox_layer"] == "bubblewrap" and record["provenance"]["scoring_note"] is None


def test_resume_after_sigkill_loses_and_repeats_nothing(tmp_path, tiny_model_dir, data_root):
    tasks = [("qwen3vl_text/text_csv", i) for i in (1634, 1635, 1636, 1637, 2906, 2907, 2908, 2909, 1956, 1957)]
    spec = make_spec(tmp_path, tiny_model_dir, data_root, tasks, batch_tokens=1,
                     generation={"do_sample": False, "max_new_tokens": 24})
    out = records_path(spec)
    cli = [sys.executable, "-m", "hpc_rerun.cli", "worker", str(spec)]
    proc = subprocess.Popen(cli, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or out.read_bytes().count(b"\n") < 3):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = out.read_bytes().count(b"\n")
    assert 3 <= before < len(tasks), "killed mid-shard"
    with open(out, "ab") as fh:
        fh.write(b'{"id": 7, "FileName": "employment-tab')  # a record torn by the kill
    subprocess.run(cli, check=True, timeout=300, capture_output=True)
    records = records_by_key(spec)
    assert set(records) == set(tasks)
    assert out.read_bytes().endswith(b"}\n"), "the torn line was cut off before appending"


def oom_above(limit_tokens: int, calls: list):
    """Fake what cannot happen on a CPU: a CUDA OOM (the real exception class) above a batch's prompt tokens."""
    def generate(generate_encoded):
        def wrapped(encoded):
            calls.append((encoded.size, encoded.prompt_tokens))
            if encoded.prompt_tokens > limit_tokens:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
            return generate_encoded(encoded)
        return wrapped
    return generate


@pytest.fixture
def oom_engine(monkeypatch):
    """Engines whose generate raises torch.OutOfMemoryError above ``limit`` prompt tokens per batch."""
    state = {"limit": 0, "calls": []}
    original_init = Engine.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.generate_encoded = oom_above(state["limit"], state["calls"])(self.generate_encoded)

    monkeypatch.setattr(Engine, "__init__", init)
    return state


def test_oom_ladder_halves_the_budget_then_gives_up_with_a_class(tmp_path, tiny_model_dir, data_root, oom_engine):
    oom_engine["limit"] = 2600
    tasks = [("qwen3vl_text/text_csv", 1), ("qwen3vl_text/text_csv", 1634),
             ("qwen3vl_resize_pic/image", 1), ("qwen3vl_text/text_csv", 2)]
    spec = make_spec(tmp_path, tiny_model_dir, data_root, tasks, batch_tokens=100_000)
    run_shard(spec)
    records = records_by_key(spec)
    assert set(records) == set(tasks), "one task's OOM never stops the shard"
    big = records[("qwen3vl_text/text_csv", 1)]["provenance"]  # ~6K tokens: budget 3K, then 1.5K fits
    assert big["error_class"] == "format_failure" and big["retries"] == 2
    assert 0 < big["truncated_to_tokens"] <= 2600 < big["prompt_tokens"]
    small = records[("qwen3vl_text/text_csv", 1634)]["provenance"]  # fits alone: the batch was split
    assert small["retries"] == 0 and small["error_class"] == "format_failure"
    assert any(size > 1 for size, _ in oom_engine["calls"]), "they were first tried as one batch"


def test_oom_that_never_fits_is_recorded_per_modality(tmp_path, tiny_model_dir, data_root, oom_engine):
    oom_engine["limit"] = 0  # everything runs out of memory
    tasks = [("qwen3vl_text/text_csv", 2), ("qwen3vl_resize_pic/image", 3)]
    spec = make_spec(tmp_path, tiny_model_dir, data_root, tasks)
    run_shard(spec)
    records = records_by_key(spec)
    text = records[("qwen3vl_text/text_csv", 2)]
    assert text["Prediction"].startswith("[ERROR] OOM: Text too large (")
    assert text["provenance"]["error_class"] == "oom_text" and text["provenance"]["retries"] == 3
    image = records[("qwen3vl_resize_pic/image", 3)]
    assert image["Prediction"] == "[ERROR] OOM: Image too large ((640, 480))"
    assert image["provenance"]["error_class"] == "oom_image" and image["provenance"]["retries"] == 3
    assert image["provenance"]["pixel_cap"] < 640 * 480 // 4, "the pixel cap was halved each time"
    assert image["provenance"]["image_pixels"] <= image["provenance"]["pixel_cap"]


def test_bad_inputs_never_reach_the_model(tmp_path, tiny_model_dir, data_root, monkeypatch):
    (data_root / "image" / "science-table32.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    csv = data_root / "csv"
    csv.unlink()
    csv.mkdir()
    queries = json.loads(TASKS.read_text())["queries"]
    escape = dict(next(q for q in queries if q["id"] == 1), id=1, FileName="../../../etc/passwd")
    task_list = tmp_path / "tasks.json"
    task_list.write_text(json.dumps({"queries": [escape] + [q for q in queries if q["id"] != 1]}))
    monkeypatch.setattr(worker_module, "Engine", lambda *a, **k: pytest.fail("the model must not be loaded"))
    tasks = [("qwen3vl_text/text_csv", 1), ("qwen3vl_resize_pic/image", 1634),
             ("qwen3vl_default_pic/mix_markdown", 2216)]
    spec = make_spec(tmp_path, tiny_model_dir, data_root, tasks, task_list=str(task_list))
    run_shard(spec)
    records = records_by_key(spec)
    classes = {key: r["provenance"]["error_class"] for key, r in records.items()}
    assert classes == {("qwen3vl_text/text_csv", 1): "bad_input", ("qwen3vl_resize_pic/image", 1634): "bad_input",
                       ("qwen3vl_default_pic/mix_markdown", 2216): "missing_input"}
    assert "escapes the data root" in records[("qwen3vl_text/text_csv", 1)]["Prediction"]
    assert "cannot decode image" in records[("qwen3vl_resize_pic/image", 1634)]["Prediction"]


def test_a_table_that_is_not_utf8_is_answered_as_the_users_read_it_and_scan_agrees(tmp_path, tiny_model_dir,
                                                                                   data_root):
    """Their script read every table with errors='ignore' and answered these tasks: the scan counts them
    runnable, the worker answers them (bytes dropped, counted on the item); a missing table is neither."""
    from hpc_rerun.benchmark import Config
    from hpc_rerun.scan import SourceIndex, missing_inputs

    csv = data_root / "csv"
    csv.unlink()
    csv.mkdir()
    original = (MINI / "data" / "csv" / "employment-table01.csv").read_bytes()
    (csv / "employment-table01.csv").write_bytes(original[:40] + b"\xff\xfe" + original[40:] + b"\x80")
    tasks = load_tasks(TASKS)
    config = Config.parse("qwen3vl_text/text_csv")
    index = SourceIndex(data_root)
    assert missing_inputs(index, tasks[2], config) == [] and missing_inputs(index, tasks[438], config) != []
    spec = make_spec(tmp_path, tiny_model_dir, data_root,
                     [("qwen3vl_text/text_csv", 2), ("qwen3vl_text/text_csv", 438)])
    run_shard(spec)
    records = records_by_key(spec)
    answered = records[("qwen3vl_text/text_csv", 2)]["provenance"]
    assert answered["error_class"] in (None, "format_failure") and answered["table_bytes_dropped"] == 3
    assert records[("qwen3vl_text/text_csv", 438)]["provenance"]["error_class"] == "missing_input"


def test_huge_png_opens_without_bomb_error_and_is_capped(tmp_path, tiny_model_dir, data_root, monkeypatch):
    Image.new("RGB", (7000, 5000), "white").save(data_root / "image" / "economy-table14.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)  # 35 MP would be a "decompression bomb"
    spec = make_spec(tmp_path, tiny_model_dir, data_root, [("qwen3vl_resize_pic/image", 438)])
    run_shard(spec)
    (record,) = records_by_key(spec).values()
    assert record["provenance"]["error_class"] == "format_failure", record["Prediction"]
    assert record["provenance"]["image_pixels"] <= RESIZE["max_pixels"] == record["provenance"]["pixel_cap"]
    fitted = Engine(str(tiny_model_dir), dtype="float32").fit_image(Image.new("RGB", (7500, 7000)), None, None)
    assert fitted.size[0] * fitted.size[1] <= 16384 * 32 * 32 and fitted.size[0] % 32 == 0


def seed_way(engine: Engine, request: Request, generation: dict) -> str:
    """What the seed did: one task, HF generate, batch 1."""
    inputs = engine._process([request])
    out = engine.model.generate(**inputs, **generation)
    return engine.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.fixture
def engine_requests(tiny_model_dir, data_root):
    engine = Engine(str(tiny_model_dir), dtype="float32")
    tasks = load_tasks(TASKS)
    image = engine.fit_image(Image.open(data_root / "image" / "science-table32.png").convert("RGB"), None, None)
    table = "\n".join(f"{n},{n * 7 % 13}" for n in range(40))
    prompts = [(tasks[1634], "text", "csv", "a,b\n1,2", None), (tasks[1635], "image", None, None, image),
               (tasks[1636], "mix", "csv", "a,b\n1,2\n3,4\n5,6", image), (tasks[1], "text", "csv", table, None)]
    return engine, [(build_prompt_text(t, modality, fmt, text, DEFAULT_PROMPTS), image)
                    for t, modality, fmt, text, image in prompts]


def test_engine_packed_batch_equals_one_by_one_in_fp32_greedy(engine_requests):
    """Packed prompts, one K/V pool, per-sequence attention: the same tokens as the seed's way,
    whole prompts or long ones prefilled in pieces."""
    engine, prompts = engine_requests
    greedy = {"do_sample": False, "max_new_tokens": 12, "min_new_tokens": 12}
    requests = [Request(text, image, greedy) for text, image in prompts]
    assert engine.encode(requests).prompts is not None, "greedy settings take the packed path"
    expected = [seed_way(engine, r, greedy) for r in requests]
    assert engine.generate_encoded(engine.encode(requests)) == expected
    # Passes of 37 tokens: every prompt in pieces, each attending to the cache of its earlier pieces,
    # the image's 300 tokens kept in one piece.
    engine.packed.prefill_tokens = 37
    assert engine.generate_encoded(engine.encode(requests[::-1])) == expected[::-1]


def test_engine_stops_each_sequence_at_its_end_token(tiny_model_dir, data_root):
    """Each sequence stops at its own end token (the answering model says its answer, then <|im_end|>);
    min_new_tokens holds the end token back as HF does."""
    from hpc_rerun.inference.tinymodel import build_tiny_qwen3vl

    answering = build_tiny_qwen3vl(data_root.parent / "answering", answer="[Final Answer]: Yes")
    engine = Engine(str(answering), dtype="float32")
    short = {"do_sample": False, "max_new_tokens": 30}
    held = {"do_sample": False, "max_new_tokens": 30, "min_new_tokens": 30}
    for generation in (short, held):
        requests = [Request("Is it?", None, generation),
                    Request("Is it, for this longer table a,b 1,2?", None, generation)]
        expected = [seed_way(engine, r, generation) for r in requests]
        assert engine.generate_encoded(engine.encode(requests)) == expected
    shorter = engine.generate_encoded(engine.encode([Request("Is it?", None, short)]))
    assert expected[0] != shorter[0], "min_new_tokens changed the output"


def test_engine_streams_batches_by_cache_tokens_and_padded_ones_by_padding(engine_requests):
    """Batches form in the items' order as their prompts get ready, and close when the next would not fit."""
    engine, _ = engine_requests
    greedy = {"do_sample": False, "max_new_tokens": 100}
    ready = lambda r: r  # noqa: E731 - prompts of known size, nothing to prepare
    failures = []
    requests = [Request("x", None, greedy, prompt_tokens=n) for n in (900, 100, 400, 300)]
    # packed: prompt + 100 new tokens each, summed: 1000 alone; then 200 + 500 + 400 = 1100 fit
    batches = list(engine.stream_batches(requests, ready, failures.append, greedy, batch_tokens=1100))
    assert [[r.prompt_tokens for r in b] for b in batches] == [[900], [100, 400, 300]]
    banned = dict(greedy, no_repeat_ngram_size=3)  # HF generate: rows padded, 3 x 400 > 1100
    requests = [Request("x", None, banned, prompt_tokens=n) for n in (900, 100, 400, 300)]
    batches = list(engine.stream_batches(requests, ready, failures.append, banned, batch_tokens=1100))
    assert [[r.prompt_tokens for r in b] for b in batches] == [[900], [100, 400], [300]]
    assert failures == []


def test_prompts_are_prepared_a_few_ahead_of_the_gpu_and_failures_do_not_stop_the_stream(engine_requests):
    engine, _ = engine_requests
    greedy = {"do_sample": False, "max_new_tokens": 100}
    prepared, failed = [], []

    def prepare(request):
        if request.text == "bad":
            raise ValueError("broken table")
        prepared.append(request)
        return request

    requests = [Request("bad" if n == 3 else "x", None, greedy, prompt_tokens=900) for n in range(40)]
    stream = engine.stream_batches(requests, prepare, lambda r, err: failed.append((r, str(err))), greedy,
                                   batch_tokens=1000)
    first = next(stream)
    assert first == [requests[0]] and len(prepared) < 20, "the first batch runs before the rest is prepared"
    rest = list(stream)
    assert len(rest) == 38 and failed == [(requests[3], "broken table")]


def test_engine_falls_back_to_padded_generate_for_settings_it_does_not_implement(engine_requests, caplog):
    engine, prompts = engine_requests
    banned = {"do_sample": False, "max_new_tokens": 8, "no_repeat_ngram_size": 2}
    requests = [Request(text, image, banned) for text, image in prompts[:3]]
    packed_sampling._say_fallback.cache_clear()
    encoded = engine.encode(requests)
    assert encoded.prompts is None and encoded.padded is not None
    assert "no_repeat_ngram_size need HF generate" in caplog.text, "the slower path is named once"
    assert engine.generate_encoded(encoded) == [seed_way(engine, r, banned) for r in requests]


def test_engine_sampling_follows_the_warpers(engine_requests):
    """top_k=1 leaves only the best token, whatever the temperature: sampling must equal greedy;
    with Qwen's settings, two seeds give different text but the same seed the same."""
    engine, prompts = engine_requests

    def requests(generation: dict) -> list[Request]:
        return [Request(text, image, generation) for text, image in prompts]

    greedy = engine.generate_encoded(engine.encode(requests({"do_sample": False, "max_new_tokens": 10})))
    top1 = {"do_sample": True, "temperature": 5.0, "top_k": 1, "max_new_tokens": 10}
    assert engine.generate_encoded(engine.encode(requests(top1))) == greedy
    qwen = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "max_new_tokens": 10}
    torch.manual_seed(1)
    first = engine.generate_encoded(engine.encode(requests(qwen)))
    torch.manual_seed(1)
    assert engine.generate_encoded(engine.encode(requests(qwen))) == first
    torch.manual_seed(2)
    assert engine.generate_encoded(engine.encode(requests(qwen))) != first


def test_users_prompt_modules_are_used_as_the_fork_did(tmp_path):
    module = tmp_path / "inference" / "answer_prompt_llm.py"
    module.parent.mkdir()
    module.write_text('Answer_Prompt = {"Fact Checking": "Read the {format} table."}\n'
                      'User_Prompt = "T: {Table}\\nQ: {Question}\\nF: {Answer_format}"\n')
    prompts = load_prompt_set(tmp_path, "text")
    task = load_tasks(TASKS)[1]
    text = build_prompt_text(task, "text", "html", "<table/>", prompts)
    assert text == f"Read the html table.\nT: <table/>\nQ: {task.question}\nF: AnswerName1, AnswerName2..."
    with pytest.raises(ValueError, match="answer_prompt_mlm.py: prompt module not found"):
        load_prompt_set(tmp_path, "image")


def test_per_task_overrides_from_resubmit_are_honoured(tmp_path, tiny_model_dir, data_root):
    from hpc_rerun.resubmit import escalate_task
    from hpc_rerun.rundir import Record

    oom_image = Record.from_dict({"provenance": {"error_class": "oom_image", "image_pixels": 200_000}})
    oom_text = Record.from_dict({"provenance": {"error_class": "oom_text", "prompt_tokens": 40_000,
                                                "truncated_to_tokens": 9_000}})
    image_entry = escalate_task({"config": "qwen3vl_resize_pic/image", "id": 2}, oom_image)
    text_entry = escalate_task({"config": "qwen3vl_text/text_csv", "id": 1}, oom_text)
    assert image_entry == {"config": "qwen3vl_resize_pic/image", "id": 2, "max_pixels": 100_000}
    assert text_entry == {"config": "qwen3vl_text/text_csv", "id": 1, "token_budget": 4_500}
    other = Record.from_dict({"provenance": {"error_class": "other"}})
    assert escalate_task({"config": "x/image", "id": 3}, other) == {
        "config": "x/image", "id": 3}
    spec = make_spec(tmp_path, tiny_model_dir, data_root, [])
    data = json.loads(spec.read_text())
    data["tasks"] = [image_entry, text_entry]
    spec.write_text(json.dumps(data))
    run_shard(spec)
    records = records_by_key(spec)
    image = records[("qwen3vl_resize_pic/image", 2)]["provenance"]
    assert image["pixel_cap"] == 100_000 and image["image_pixels"] <= 100_000
    text = records[("qwen3vl_text/text_csv", 1)]["provenance"]
    assert text["truncated_to_tokens"] <= 4_500 < text["prompt_tokens"]


def test_a_signal_during_generate_waits_for_the_batch_and_never_becomes_a_task_error(
        tmp_path, tiny_model_dir, data_root, monkeypatch):
    """Slurm's USR2 lands while the model generates. submitit's handler, when the element may not requeue
    again, raises UncompletedJobError (an Exception): raised there, the worker's guard around a batch took it
    for a broken task and wrote a false error record. Now the signal is only noted and submitit's handler
    runs once the batch's answers are written: the element ends with submitit's verdict, every answer real.
    The handler here is submitit's own SignalHandler, given a job that has used up its requeues."""
    import submitit
    from submitit.core.job_environment import SignalHandler
    from submitit.core.utils import DelayedSubmission, JobPaths, UncompletedJobError

    from hpc_rerun.inference.job import ShardJob

    tasks = [("qwen3vl_text/text_csv", i) for i in (1634, 1635, 1636, 1637)]
    spec = make_spec(tmp_path, tiny_model_dir, data_root, tasks, batch_tokens=1)
    delayed = DelayedSubmission(ShardJob(), str(spec))
    delayed._timeout_countdown = 0  # no requeue left: the handler raises
    for name, value in {"_TEST_CLUSTER_": "slurm", "SLURM_JOB_ID": "1", "SLURM_PROCID": "0"}.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "submitit").mkdir()
    handler = SignalHandler(submitit.JobEnvironment(), JobPaths(tmp_path / "submitit", job_id="1_0"), delayed)
    monkeypatch.setattr(handler, "has_timed_out", lambda: True)
    signalled = []
    generate = Engine.generate_encoded

    def signal_in_the_first_batch(self, encoded):
        if not signalled:
            signalled.append(True)
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(0.1)  # the signal arrives here, inside the batch
        return generate(self, encoded)

    monkeypatch.setattr(Engine, "generate_encoded", signal_in_the_first_batch)
    previous = signal.signal(signal.SIGUSR2, handler.checkpoint_and_try_requeue)
    try:
        with pytest.raises(UncompletedJobError, match="timed-out too many times"):
            delayed.result()
    finally:
        signal.signal(signal.SIGUSR2, previous)
    records = records_by_key(spec)
    assert signalled and 1 <= len(records) < len(tasks), "stopped after the batch it was signalled in"
    assert not any("Uncompleted" in str(r["Prediction"]) for r in records.values()), records
    assert all(r["provenance"]["error_class"] in (None, "format_failure") for r in records.values())
