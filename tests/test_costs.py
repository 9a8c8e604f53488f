"""plan's cost model: this engine's rates, prompts as the worker truncates them, the batch's decode shared."""

from __future__ import annotations

import pytest

from hpc_rerun.benchmark import Task
from hpc_rerun.plan import BATCH_CACHE_TOKENS, DECODE_STEP_S, CostModel

TASK = Task(1, "x", "Fact Checking", None, "q", "a")


def test_prompts_past_the_context_cost_what_their_truncation_costs(tmp_path):
    model = CostModel(tmp_path, generation={"max_new_tokens": 4096}, context=262_144)
    assert model.seconds(TASK, 1_124_000) == model.seconds(TASK, 262_144 - 4096)
    assert model.seconds(TASK, 200_000) < model.seconds(TASK, 258_048)


def test_attention_makes_long_prompts_cost_more_than_in_proportion(tmp_path):
    model = CostModel(tmp_path, generation={"max_new_tokens": 128, "min_new_tokens": 128})
    short, long = model.seconds(TASK, 16_000), model.seconds(TASK, 256_000)
    assert long > 16 * short * 1.5, (short, long)


def test_a_prompt_that_fills_its_batch_pays_for_every_decode_step(tmp_path):
    """64 more answer tokens (128 held by min_new_tokens vs the 64 expected): all of those decode steps for a
    prompt alone in its batch, its share of the cache for a short one."""

    def more_steps(prompt_tokens: int) -> float:
        held = CostModel(tmp_path, generation={"max_new_tokens": 128, "min_new_tokens": 128})
        expected = CostModel(tmp_path, generation={"max_new_tokens": 128})
        return held.seconds(TASK, prompt_tokens) - expected.seconds(TASK, prompt_tokens)

    assert more_steps(250_000) == pytest.approx(64 * DECODE_STEP_S)
    assert more_steps(1_000) == pytest.approx(64 * DECODE_STEP_S * 1_128 / BATCH_CACHE_TOKENS)
