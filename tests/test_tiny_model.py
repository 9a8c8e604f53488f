"""The tiny Qwen3-VL loads and generates through the same code path as Qwen3-VL-8B-Instruct."""

from __future__ import annotations

import hashlib

import pytest
import torch
from PIL import Image, ImageDraw
from qwen_vl_utils import process_vision_info
from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

from hpc_rerun.inference.tinymodel import build_tiny_qwen3vl


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    return model, processor


@pytest.fixture
def table_png(tmp_path):
    image = Image.new("RGB", (320, 200), "white")
    draw = ImageDraw.Draw(image)
    for row, text in enumerate(["Year  Total", "1954  60890", "1955  62170"]):
        draw.text((12, 12 + 40 * row), text, fill="black")
    path = tmp_path / "table.png"
    image.save(path)
    return path


def message(text: str, image=None) -> list[dict]:
    content = [{"type": "image", "image": str(image)}] if image else []
    return [{"role": "user", "content": content + [{"type": "text", "text": text}]}]


def generate(model, processor, conversations, new_tokens=12):
    texts = [processor.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    images, videos, video_kwargs = process_vision_info(
        conversations, image_patch_size=16, return_video_kwargs=True, return_video_metadata=True
    )
    inputs = processor(
        text=texts, images=images, videos=videos, padding=True, padding_side="left",
        return_tensors="pt", do_resize=False, **video_kwargs,
    )
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return inputs, out[:, inputs["input_ids"].shape[1]:]


def test_builder_is_small_and_deterministic(tiny_model_dir, tmp_path):
    again = build_tiny_qwen3vl(tmp_path / "again")
    files = sorted(p.name for p in tiny_model_dir.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= set(files)
    assert sum(p.stat().st_size for p in tiny_model_dir.iterdir()) < 2 * 1024 * 1024
    for name in files:
        digest = hashlib.sha256((tiny_model_dir / name).read_bytes()).hexdigest()
        assert digest == hashlib.sha256((again / name).read_bytes()).hexdigest(), name


def test_chat_template_is_qwen_style(loaded, table_png):
    _, processor = loaded
    text = processor.apply_chat_template(message("How many rows?", table_png), tokenize=False,
                                         add_generation_prompt=True)
    assert text == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>How many rows?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("modality", ["text", "image", "mix"])
def test_generates_for_each_modality(loaded, table_png, modality):
    model, processor = loaded
    table = "| Year | Total |\n| 1955 | 62170 |\n"
    conv = {
        "text": message(table + "Which year?"),
        "image": message("Which year?", table_png),
        "mix": message(table + "Which year?", table_png),
    }[modality]
    inputs, new = generate(model, processor, [conv])
    assert new.shape == (1, 12)
    image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    if modality == "text":
        assert image_tokens == 0 and "pixel_values" not in inputs
    else:
        # 320x200 px in 16 px patches merged 2x2: one visual token per 32x32 px.
        grid = inputs["image_grid_thw"][0].tolist()
        assert image_tokens == grid[1] * grid[2] // 4 > 0


def test_left_padded_batch_equals_one_by_one(loaded, table_png):
    model, processor = loaded
    conversations = [
        message("Which year had the highest total?"),
        message("Total?", table_png),
        message("| a | b |\n| 1 | 2 |\n| 3 | 4 |\nSum of column b, explained step by step please.", table_png),
        message("Hi"),
    ]
    _, batched = generate(model, processor, conversations)
    for i, conv in enumerate(conversations):
        _, single = generate(model, processor, [conv])
        assert torch.equal(single[0], batched[i]), f"conversation {i} differs between batch and single"
