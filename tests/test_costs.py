"""plan's cost model: this engine's rates, prompts as the worker truncates them, the batch's decode shared."""

from __future__ import annotations

from hpc_rerun.benchmark import Task
from hpc_rerun.plan import CostModel

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
    model = CostModel(tmp_path, generation={"max_new_tokens": 128, "min_new_tokens": 128})
    without_decode = CostModel(model.data_root, generation={"max_new_tokens": 128, "min_new_tokens": 0})
    lone = model.seconds(TASK, 250_000) - without_decode.seconds(TASK, 250_000)
    assert lone > 0.9 * (128 - 64) * 0.042, "a batch of one decodes for that one task"
    small = model.seconds(TASK, 1_000)
    assert small < 0.25 + 0.1, small  # shares its batch's steps with many others
