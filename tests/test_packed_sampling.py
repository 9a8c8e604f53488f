"""The packed loop applies generation settings exactly as HF generate does (CPU, fp32, tiny Qwen3-VL).

The tiny model carries Qwen3-VL-8B-Instruct's own generation_config.json (sampling, top-k 20, top-p 0.8,
temperature 0.7, repetition_penalty 1.0, two end tokens), so what runs here is what the real model runs.
"""

from __future__ import annotations

import logging

import pytest
import torch

from hpc_rerun.inference.engine import Engine, Request
from hpc_rerun.inference.engine import sampling as packed_sampling
from hpc_rerun.plan import RunSettings

PROMPTS = ["Is the total of column b larger than 40? a,b\n1,2\n3,4\n5,6", "Which row has the largest a? a,b\n7,1\n2,9",
           "Name the header of the table: Year,Region,Sector\n1990,R1,S2"]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine(str(tiny_model_dir), dtype="float32")


def hf_one_by_one(engine: Engine, text: str, generation: dict, seed: int | None = None) -> list[int]:
    """The seed's way: HF generate on one prompt (the model's generation_config, then ``generation``)."""
    inputs = engine._process([Request(text, None, generation)])
    if seed is not None:
        torch.manual_seed(seed)
    out = engine.model.generate(**inputs, **generation)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def packed_ids(engine: Engine, texts: list[str], generation: dict, seed: int | None = None) -> list[list[int]]:
    encoded = engine.encode([Request(t, None, generation) for t in texts])
    assert encoded.prompts is not None, f"{generation} must run packed"
    if seed is not None:
        torch.manual_seed(seed)
    return engine.generate_ids(encoded)


def test_the_real_models_generation_config_runs_packed(engine, caplog):
    """Qwen3-VL-8B-Instruct ships repetition_penalty 1.0 (no penalty): that is no reason for HF generate."""
    assert engine.model.generation_config.repetition_penalty == 1.0
    packed_sampling._say_fallback.cache_clear()
    with caplog.at_level(logging.WARNING):
        sampling = engine.sampling(RunSettings(model="m").generation.hf_kwargs())
    assert sampling is not None and "need HF generate" not in caplog.text
    assert (sampling.temperature, sampling.top_k, sampling.top_p, sampling.repetition_penalty) == (0.7, 20, 0.8, 1.0)
    assert sampling.eos_token_ids == list(engine.model.generation_config.eos_token_id)
    # no-op values of settings the loop has no code for do not leave it either
    assert engine.sampling({"max_new_tokens": 8, "num_beams": 1, "length_penalty": 1.0, "typical_p": 1.0}) is not None


@pytest.mark.parametrize("penalty", [1.05, 1.5])
def test_repetition_penalty_over_prompt_and_answer_equals_hf_generate(engine, penalty):
    """Greedy, 24 tokens: the penalty must change the answer (it does at 1.5) and equal HF's one by one."""
    generation = {"do_sample": False, "max_new_tokens": 24, "min_new_tokens": 24, "repetition_penalty": penalty}
    expected = [hf_one_by_one(engine, t, generation) for t in PROMPTS]
    assert packed_ids(engine, PROMPTS, generation) == expected
    engine.packed.prefill_tokens = 7  # prompts in pieces: the penalty sees the whole prompt all the same
    try:
        assert packed_ids(engine, PROMPTS, generation) == expected
    finally:
        engine.packed.prefill_tokens = 32768
    if penalty == 1.5:
        plain = [hf_one_by_one(engine, t, dict(generation, repetition_penalty=1.0)) for t in PROMPTS]
        assert plain != expected, "the test must see the penalty at work"


def test_qwen_sampling_with_a_penalty_equals_hf_generate_seed_for_seed(engine):
    """Sampling (T 0.7, top-k 20, top-p 0.8) with repetition_penalty 1.05 and min_p: the same random draws
    give the same tokens as HF generate, one prompt at a time."""
    generation = {"max_new_tokens": 16, "min_new_tokens": 16, "repetition_penalty": 1.05, "min_p": 0.05}
    for seed, text in enumerate(PROMPTS):
        assert packed_ids(engine, [text], generation, seed) == [hf_one_by_one(engine, text, generation, seed)]


def test_min_p_of_one_keeps_only_the_best_token(engine):
    """min_p 1.0 drops every token less likely than the best: sampling at any temperature is greedy."""
    greedy = packed_ids(engine, PROMPTS, {"do_sample": False, "max_new_tokens": 12})
    hot = {"do_sample": True, "temperature": 3.0, "top_k": 0, "top_p": 1.0, "min_p": 1.0, "max_new_tokens": 12}
    assert packed_ids(engine, PROMPTS, hot, seed=3) == greedy


@pytest.mark.parametrize("setting", [{"num_beams": 2}, {"no_repeat_ngram_size": 2}])
def test_what_only_hf_can_do_falls_back_and_is_named(engine, caplog, setting):
    packed_sampling._say_fallback.cache_clear()
    generation = {"do_sample": False, "max_new_tokens": 6, **setting}
    with caplog.at_level(logging.WARNING):
        encoded = engine.encode([Request(t, None, generation) for t in PROMPTS])
    assert encoded.prompts is None and encoded.padded is not None
    assert f"{next(iter(setting))} need HF generate" in caplog.text
