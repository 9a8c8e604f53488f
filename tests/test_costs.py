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


def test_a_group_pays_for_its_table_once_and_stays_in_one_shard(tmp_path):
    """Tasks of one configuration, table and question type: the first pays for the table, the others for
    their question (the engine prefills the common part once), and no shard gets part of a group."""
    from hpc_rerun.benchmark import Config, Variant
    from hpc_rerun.inference.engine import sequences
    from hpc_rerun.plan import SHARE_MIN_TOKENS, pack_shards

    assert SHARE_MIN_TOKENS == sequences.SHARE_MIN_TOKENS, "plan counts sharing as the engine does it"
    (tmp_path / "html").mkdir()
    (tmp_path / "html" / "big.html").write_text("<td>1</td>\n" * 300_000)  # ~900K tokens by the byte estimate
    (tmp_path / "html" / "small.html").write_text("<td>1</td>\n" * 2_000)
    model = CostModel(tmp_path, generation={"max_new_tokens": 128})
    config, variant = Config.parse("qwen3vl_text/text_html"), Variant("qwen3vl_text")
    big = [Task(n, "big", "Fact Checking", None, f"question {n}?", "a") for n in range(3)]
    other_type = Task(3, "big", "Data Analysis", None, "question?", "a")
    small = [Task(10 + n, "small", "Fact Checking", None, "q?", "a") for n in range(4)]
    costs = model.costs([(config, t, variant, {}) for t in big + [other_type] + small])
    first, later = costs[0].seconds, [c.seconds for c in costs[1:3]]
    assert max(later) < first / 50, (first, later)
    assert costs[3].seconds >= first, "another question type prompts differently: it pays for the table"
    for shards in (2, 3):  # as many groups as shards or more (split_groups: fewer)
        packed_shards = pack_shards(costs, shards)
        homes = {}
        for number, shard in enumerate(packed_shards):
            for cost in shard:
                homes.setdefault(cost.group, set()).add(number)
        assert all(len(h) == 1 for h in homes.values()), homes
        assert sorted(c.id for s in packed_shards for c in s) == sorted(c.id for c in costs)


def test_more_shards_than_groups_split_the_heaviest_groups_and_charge_their_table_again(tmp_path):
    from hpc_rerun.benchmark import Config, Variant
    from hpc_rerun.plan import pack_shards

    (tmp_path / "html").mkdir()
    (tmp_path / "html" / "big.html").write_text("<td>1</td>\n" * 300_000)
    model = CostModel(tmp_path, generation={"max_new_tokens": 128})
    config, variant = Config.parse("qwen3vl_text/text_html"), Variant("qwen3vl_text")
    tasks = [Task(n, "big", "Fact Checking", None, f"question {n}?", "a") for n in range(6)]
    costs = model.costs([(config, t, variant, {}) for t in tasks])
    one_shard = pack_shards(costs, 1)
    three = pack_shards(costs, 3)
    assert len(one_shard) == 1 and len(three) == 3
    assert sorted(c.id for s in three for c in s) == list(range(6))
    heavy = costs[0].seconds
    assert all(max(c.seconds for c in shard) == pytest.approx(heavy) for shard in three), \
        "each shard's first task of the group pays for the table"


@pytest.mark.parametrize("limits", [(None, None), (256 * 28 * 28, 2048 * 28 * 28), (None, 16 * 32 * 32),
                                    (256 * 28 * 28, 4 * 32 * 32)])
def test_planner_sizes_images_as_the_models_processor_does(limits, tiny_model_dir):
    """pixels.py (torch-free, for the planner) gives every image the grid Qwen3-VL's own image processor gives
    it: the processor's defaults (the real preprocessor_config's 65,536 to 16,777,216 px), resize_pic's limits,
    and caps the worker lowers below the minimum (a shrunk image)."""
    from transformers import AutoProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    from hpc_rerun.pixels import TOKEN_PIXELS, pixel_limits, resized, visual_tokens

    processor = AutoProcessor.from_pretrained(tiny_model_dir).image_processor
    min_pixels, max_pixels = limits
    low, high = pixel_limits(min_pixels, max_pixels)
    as_called = {} if limits == (None, None) else {"min_pixels": low, "max_pixels": high}
    sizes = [(h, w) for h in (1, 15, 31, 33, 200, 240, 1000, 4093, 4279, 7000, 15500)
             for w in (1, 17, 240, 320, 999, 3000, 5705, 7001, 15000) if max(h, w) / min(h, w) <= 200]
    for h, w in sizes:
        assert resized(h, w, low, high) == smart_resize(h, w, TOKEN_PIXELS, low, high), (h, w)
        merged_patches = processor.get_number_of_image_patches(h, w, as_called) // processor.merge_size**2
        assert visual_tokens(w, h, min_pixels, max_pixels) == merged_patches, (h, w)
