"""Fitting table images for the model: the worker's old way vs the processor's own resize, side by side.

    .venv/bin/python bench/image_resize.py [--repeat 3] [--sizes 240x200,1200x900,5705x4279,7000x5000,16000x14577]

For each size (synthetic table images: white, rules, digits, a tinted header) and both variants' pixel limits
(default_pic: the processor's own 65,536-16,777,216 px; resize_pic: 256x28x28-2048x28x28), it times

- before: the worker's ``fit_image`` before this change (``git show 3ae97af:hpc_rerun/inference/engine.py``):
  ``Image.reduce()`` first when the image has over 4x the cap, qwen_vl_utils' ``smart_resize`` with a
  4,096 px minimum, PIL bicubic;
- after: ``Engine.fit_image``: the image processor's own sizing and resize (torchvision, bicubic with
  antialias on 8-bit values) on a read-only view of the image's pixels, timed as for the first task that
  shows the image (later tasks of the image and re-asks get the fit the engine remembers);

wall and CPU seconds of the fit alone (the median of ``--repeat``; normalising the fitted image costs the
same either way), beside what decoding the image's PNG costs the worker (``open_image``, once per image and
shard: tasks that show one image share it), and how the model's input compares with the users' processor
path (their processor, built as their scripts built it, on the original image): grid equal, the largest
difference in 8-bit levels, the share of values equal. The tiny model's processor is the real one
(the class AutoProcessor gives Qwen3-VL; the real preprocessor_config's limits).
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time

import numpy as np
from PIL import Image, ImageDraw

from hpc_rerun.benchmark import DEFAULT_VARIANTS
from hpc_rerun.inference.engine import Engine
from hpc_rerun.inference.tinymodel import build_tiny_qwen3vl
from hpc_rerun.inference.worker import open_image

LEVEL = 2 / 255  # one 8-bit level in the processor's output (mean 0.5, std 0.5)
VARIANTS = ("qwen3vl_default_pic", "qwen3vl_resize_pic")


def table_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, width, max(height // 12, 2)), fill=(214, 228, 245))
    for y in range(0, height, 40):
        draw.line((0, y, width, y), fill=(40, 40, 40), width=1 + y % 2)
    for x in range(0, width, 180):
        draw.line((x, 0, x, height), fill=(90, 90, 90), width=1)
    for y in range(12, height - 20, 40):
        for x in range(10, width - 60, 180):
            draw.text((x, y), f"{int(rng.integers(0, 10**6)):,}", fill=(20, 20, 20))
    return image


def before_fit(image: Image.Image, min_pixels: int | None, max_pixels: int | None) -> Image.Image:
    """The worker's fit_image before this change, as it was."""
    from qwen_vl_utils.vision_process import smart_resize

    max_pixels = max_pixels or 16384 * 32 * 32
    min_pixels = min(min_pixels or 4 * 32 * 32, max_pixels)
    width, height = image.size
    if width * height > 4 * max_pixels:
        image = image.reduce(math.floor(math.sqrt(width * height / max_pixels)))
        width, height = image.size
    new_h, new_w = smart_resize(height, width, factor=32, min_pixels=min_pixels, max_pixels=max_pixels)
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    return image


def fit_afresh(engine: Engine, image: Image.Image, min_pixels: int | None, max_pixels: int | None) -> Image.Image:
    """Engine.fit_image as for the first task that shows the image (it remembers its last few fits)."""
    engine._fits.clear()
    return engine.fit_image(image, min_pixels, max_pixels)


def timed(fit, repeat: int) -> tuple[Image.Image, float, float]:
    walls, cpus = [], []
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        fitted = fit()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return fitted, statistics.median(walls), statistics.median(cpus)


def agreement(engine: Engine, fitted: Image.Image, theirs: dict) -> str:
    ours = engine._image_inputs(fitted)
    if ours["image_grid_thw"].tolist() != theirs["image_grid_thw"].tolist():
        return f"grid {ours['image_grid_thw'][0].tolist()} vs {theirs['image_grid_thw'][0].tolist()}"
    levels = (ours["pixel_values"] - theirs["pixel_values"]).abs() / LEVEL
    return f"grid =, max {levels.max().item():5.2f} lv, {(levels < 0.01).float().mean().item():7.2%} equal"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sizes", default="240x200,1200x900,5705x4279,7000x5000,16000x14577")
    args = parser.parse_args()
    from transformers import AutoProcessor

    Image.MAX_IMAGE_PIXELS = None
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_qwen3vl(tmp)
        engine = Engine(str(model), dtype="float32", device="cpu")
        users = {}
        for name in VARIANTS:
            limits = DEFAULT_VARIANTS[name]
            kwargs = {"min_pixels": limits.min_pixels, "max_pixels": limits.max_pixels} if limits.min_pixels else {}
            users[name] = AutoProcessor.from_pretrained(model, **kwargs).image_processor
        print(f"{'image':>12} {'decode s (cpu)':>15} {'variant':<20} {'before s (cpu)':>15} {'after s (cpu)':>15} "
              f"{'ratio':>6}  {'before vs users':<40} after vs users")
        for size in args.sizes.split(","):
            width, height = map(int, size.split("x"))
            png = f"{tmp}/{size}.png"
            table_image(width, height).save(png, compress_level=1)
            image, load_wall, load_cpu = timed(lambda: open_image(png), 1)
            decode = f"{load_wall:6.2f} ({load_cpu:5.2f})"
            for name in VARIANTS:
                limits = DEFAULT_VARIANTS[name]
                old, old_wall, old_cpu = timed(lambda: before_fit(image, limits.min_pixels, limits.max_pixels),
                                               args.repeat)
                new, new_wall, new_cpu = timed(lambda: fit_afresh(engine, image, limits.min_pixels, limits.max_pixels),
                                               args.repeat)
                theirs = users[name](images=[image], return_tensors="pt")
                print(f"{size:>12} {decode:>15} {name:<20} {old_wall:6.2f} ({old_cpu:5.2f}) "
                      f"{new_wall:6.2f} ({new_cpu:5.2f}) {new_wall / old_wall:6.2f}  "
                      f"{agreement(engine, old, theirs):<40} {agreement(engine, new, theirs)}", flush=True)
                del theirs
                decode = ""


if __name__ == "__main__":
    main()
