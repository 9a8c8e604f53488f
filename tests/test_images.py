"""Table images reach the model as the users' processor made them, and an image never makes a prompt fail
its budget: it is shrunk (recorded) instead. Tiny Qwen3-VL on the CPU; its image processor is the real one
(the class AutoProcessor gives Qwen3-VL, the real preprocessor_config's limits)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from hpc_rerun.benchmark import DEFAULT_VARIANTS, Config, load_tasks
from hpc_rerun.generation import Generation
from hpc_rerun.inference.engine import Engine
from hpc_rerun.inference.prompts import load_prompt_set
from hpc_rerun.inference.tables import TableCache
from hpc_rerun.inference.worker import load_input, prepare, run_shard
from hpc_rerun.pixels import DEFAULT_MAX_PIXELS, TOKEN_PIXELS
from hpc_rerun.rundir import ShardSpec, read_records, records_path
from hpc_rerun.scan import SourceIndex

from .conftest import MINI_DATA

MINI = Path(__file__).parent / "fixtures" / "realhitbench-mini"
TASKS = MINI / "QA_final_sc_filled.json"
IMAGE_TASK = 1634  # science-table32
LEVEL = 2 / 255  # one 8-bit level in the processor's output (mean 0.5, std 0.5)


def table_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A rendered table's kind of picture: white, thin rules, dark glyph-like strokes, a tinted header:
    sharp edges, where resamplers differ most."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, width, max(height // 12, 2)), fill=(214, 228, 245))
    for y in range(0, height, max(height // 25, 3)):
        draw.line((0, y, width, y), fill=(40, 40, 40), width=1 + y % 2)
    for x in range(0, width, max(width // 9, 3)):
        draw.line((x, 0, x, height), fill=(90, 90, 90), width=1)
    for _ in range(width * height // 2000):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        draw.text((x, y), str(int(rng.integers(0, 10**4))), fill=tuple(int(c) for c in rng.integers(0, 120, 3)))
    return image


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> Engine:
    return Engine(str(tiny_model_dir), dtype="float32")


def users_inputs(model_dir: Path, image_path: Path, variant: str) -> dict:
    """What the users' inference scripts fed the model: their processor (resize_pic: built with its
    min/max pixels, default_pic: the model's own), the image's path in the message, the chat template
    tokenised by the processor."""
    from transformers import AutoProcessor

    limits = DEFAULT_VARIANTS[variant]
    kwargs = {"min_pixels": limits.min_pixels, "max_pixels": limits.max_pixels} if limits.min_pixels else {}
    processor = AutoProcessor.from_pretrained(model_dir, **kwargs)
    messages = [{"role": "user", "content": [{"type": "image", "image": str(image_path)},
                                             {"type": "text", "text": "Which year had the most?"}]}]
    return processor.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True,
                                         return_tensors="pt")


@pytest.mark.parametrize("variant, size", [
    ("qwen3vl_default_pic", (240, 200)),  # below the minimum: enlarged
    ("qwen3vl_default_pic", (1210, 905)),
    ("qwen3vl_resize_pic", (240, 200)),
    ("qwen3vl_resize_pic", (3100, 2300)),  # over 4x resize_pic's 1.6M px maximum (bench/image_resize.py: larger)
])
def test_the_worker_feeds_the_image_as_the_users_processor_did(variant, size, engine, tiny_model_dir, tmp_path):
    """The worker's image (read, fitted to the variant's limits, through the engine's prompt) has the users'
    grid, and every pixel value is within one 8-bit level of theirs."""
    data_root = tmp_path / "data"
    task = load_tasks(TASKS)[IMAGE_TASK]
    path = data_root / "image" / f"{task.file_name}.png"
    path.parent.mkdir(parents=True)
    table_image(*size).save(path)
    config = Config.parse(f"{variant}/image")
    limits = DEFAULT_VARIANTS[variant]
    settings = {"min_pixels": limits.min_pixels, "max_pixels": limits.max_pixels}
    ti = load_input(config, task, data_root, settings, 32_768, SourceIndex(data_root), {})
    ti.prompts = load_prompt_set(None, "image")
    request = prepare(engine, ti, Generation.sampled(8).hf_kwargs(), TableCache(engine.tokenizer))

    theirs = users_inputs(tiny_model_dir, path, variant)
    assert request.prompt.image_grid_thw.tolist() == theirs["image_grid_thw"].tolist()
    levels = (request.prompt.pixel_values - theirs["pixel_values"]).abs().max().item() / LEVEL
    assert levels <= 1.001, f"{levels:.2f} levels apart"


def make_spec(tmp_path, model, data_root, tasks, token_budget) -> Path:
    spec = ShardSpec(run_id="test", attempt=1, shard=0, model=str(model), data_root=str(data_root),
                     task_list=str(TASKS), tasks=[{"config": c, "id": i} for c, i in tasks], configs={},
                     generation=Generation.sampled(8).to_json(), token_budget=token_budget)
    return spec.write(tmp_path / "run")


def test_an_image_that_leaves_its_prompt_no_room_is_shrunk_not_failed(tmp_path, tiny_model_dir):
    """At a 700-token budget a 1600x1200 table image (1,900 visual tokens at default_pic's limits) fills the
    prompt alone: the worker halves its pixel cap until the prompt fits, with at least half the budget left
    to a table it had to cut, and says so on the item; image-only prompts likewise."""
    data_root = tmp_path / "data"
    data_root.mkdir()
    for folder in MINI_DATA.iterdir():
        (data_root / folder.name).symlink_to(folder)
    (data_root / "image").mkdir()
    task = load_tasks(TASKS)[IMAGE_TASK]
    table_image(1600, 1200).save(data_root / "image" / f"{task.file_name}.png")
    budget = 700
    tasks = [("qwen3vl_default_pic/mix_csv", IMAGE_TASK), ("qwen3vl_default_pic/image", IMAGE_TASK)]
    spec = make_spec(tmp_path, tiny_model_dir, data_root, tasks, token_budget=budget)
    run_shard(spec)
    records = {r["provenance"]["config"]: r["provenance"] for r in read_records(records_path(spec))}
    assert set(records) == {config for config, _ in tasks}
    for config, provenance in records.items():
        assert provenance["error_class"] not in ("oom_text", "oom_image"), (config, provenance)
        assert provenance["image_shrunk_for_budget"] is True, config
        assert provenance["image_pixels"] <= provenance["pixel_cap"] < DEFAULT_MAX_PIXELS
    mix = records["qwen3vl_default_pic/mix_csv"]
    assert mix["truncated_to_tokens"] <= budget < mix["prompt_tokens"]
    assert mix["image_pixels"] // TOKEN_PIXELS**2 <= budget / 2, "the cut table keeps half the budget"
