"""Tasks of one configuration, table and question type are equal up to the question: the engine cuts their
table alike and prefills that part once, and the answers stay exactly those of HF generate one by one (CPU,
fp32, the tiny Qwen3-VL with Qwen3-VL-8B-Instruct's generation_config and a real penalty on top)."""

from __future__ import annotations

import random

import pytest
import torch
from PIL import Image

from hpc_rerun.benchmark import Task
from hpc_rerun.inference.engine import TABLE_SLOT, Engine, Request
from hpc_rerun.inference.engine.sequences import SHARE_MIN_TOKENS, shared_prefix
from hpc_rerun.inference.prompts import DEFAULT_PROMPTS, build_prompt_text
from hpc_rerun.inference.tables import TableCache

QUESTIONS = ["Is the value in the last row larger than 12?",
             "Which row holds the largest value of the second column, and by how much does it exceed the first?",
             "How many rows are there?"]
TASKS = [Task(n, "t", "Fact Checking", None, q, "Yes") for n, q in enumerate(QUESTIONS)]
GENERATION = {"do_sample": False, "max_new_tokens": 10, "min_new_tokens": 10, "repetition_penalty": 1.05}


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine(str(tiny_model_dir), dtype="float32")


@pytest.fixture(scope="module")
def table(tiny_model_dir, tmp_path_factory, engine):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("tables") / "t.html"
    path.write_text("<table>\n" + "\n".join(f"  <tr><td>{rng.randint(0, 99999)}</td><td>{rng.random():.3f}</td></tr>"
                                            for _ in range(600)) + "\n</table>\n")
    return TableCache(engine.tokenizer).get(str(path))


def group(engine: Engine, table, budget: int, modality: str = "text", image=None, key="group") -> list[Request]:
    """The group's prompts as the worker makes them: the table cut leaving room for the longest question."""
    texts = [build_prompt_text(t, modality, "html", TABLE_SLOT, DEFAULT_PROMPTS) for t in TASKS]
    room = max(engine.suffix_tokens(text, image) for text in texts)
    return [engine.prepare(text, image, GENERATION, budget, table, key, room) for text in texts]


def hf_one_by_one(engine: Engine, request: Request) -> list[int]:
    inputs = engine._process([request])
    assert inputs["input_ids"][0].tolist() == request.prompt.input_ids.tolist()
    out = engine.model.generate(**inputs, **GENERATION)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("budget", [10**6, 4000, 2500])
def test_a_group_cuts_its_table_alike_and_differs_only_in_the_question(engine, table, budget):
    """Whole, by the users' rule, and inside lines: every task of the group keeps the same part of the
    table, so the prompts are equal up to the question, and each stays within the budget."""
    requests = group(engine, table, budget)
    assert len({(r.cut.rule, r.cut.keep_share, r.cut.record()["table_tokens_kept"]) for r in requests}) == 1
    first = requests[0]
    for request in requests[1:]:
        question = engine.suffix_tokens(request.text.replace(request.cut.text(), TABLE_SLOT), None)
        assert shared_prefix(first.prompt, request.prompt, engine.processor.image_token_id) >= \
            request.prompt_tokens - question - 2
        assert request.prompt_tokens <= budget
    assert {r.cut.rule for r in requests} == {None if budget == 10**6 else "lines" if budget == 4000 else "tokens"}


@pytest.mark.parametrize("pass_tokens", [32768, 700])
def test_shared_prefill_answers_exactly_as_hf_generate_one_by_one(engine, table, pass_tokens):
    """Three tasks of one group around an unrelated prompt, whole passes or pieces of 700 tokens: the
    group's beginning is prefilled once (the others take it from the first one's region) and every answer
    is HF generate's, token for token, the penalty counting the shared tokens too."""
    members = group(engine, table, 2500)
    other = engine.prepare("Name the header of the table: Year,Region\n1990,R1", None, GENERATION, 2500)
    requests = [members[0], other, members[1], members[2]]
    expected = [hf_one_by_one(engine, r) for r in requests]
    engine.packed.prefill_tokens = pass_tokens
    before = dict(engine.packed.stats)
    try:
        assert engine.generate_ids(engine.encode(requests)) == expected
    finally:
        engine.packed.prefill_tokens = 32768
    shared = engine.packed.stats["shared_tokens"] - before["shared_tokens"]
    common = shared_prefix(members[0].prompt, members[1].prompt, engine.processor.image_token_id)
    assert common >= SHARE_MIN_TOKENS and shared >= 2 * common - 4, "the group's beginning was prefilled once"


def test_same_picture_is_shared_a_different_one_is_not(engine, table):
    """Image pad tokens are the same ids whatever the picture: a prompt shares past its image only with the
    same pixels. Image + table prompts of one group answer as HF generate does."""
    picture = Image.new("RGB", (320, 256), "white")
    members = group(engine, table, 3000, "mix", picture)
    assert [engine.generate_ids(engine.encode(members))] == [[hf_one_by_one(engine, r) for r in members]]
    span = engine.packed.image_span(members[0].prompt)
    assert shared_prefix(members[0].prompt, members[1].prompt, engine.processor.image_token_id) > span[1] + 1000
    other_picture = Image.new("RGB", (320, 256), "black")
    other = group(engine, table, 3000, "mix", other_picture)[1]
    assert shared_prefix(members[0].prompt, other.prompt, engine.processor.image_token_id) == span[0]


def test_batches_count_a_shared_beginning_once(engine, table):
    """Two prompts of one group fit a cache budget that holds one whole prompt and the other's own tokens;
    without a share key (another table, say) they go in two batches."""
    budget = 2500
    shared, alone = group(engine, table, budget)[:2], group(engine, table, budget, key=None)[:2]
    new = GENERATION["max_new_tokens"]
    cache = shared[0].prompt_tokens + new + (shared[1].prompt_tokens - 1000) + new

    def batches(requests):
        return [len(b) for b in engine.stream_batches(requests, lambda r: r, pytest.fail, GENERATION, cache)]

    assert batches(shared) == [2]
    assert batches(alone) == [1, 1]
    assert torch.equal(shared[1].prompt.input_ids, alone[1].prompt.input_ids)
