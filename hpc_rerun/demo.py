"""demo: a mini benchmark with holes, written from the data bundled in the package.

Tables of three real RealHiTBench files in every format (``demo_data/``, CC BY-NC 4.0, see its
NOTICE.md), table images rendered here from the CSV, 17 tasks of all five question types, and a
result tree in the users' three layouts with every kind of gap: absent ids, OOM errors, a format
failure, an error of another kind, and tasks whose source files do not exist.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

from PIL import Image, ImageDraw

from .backends import SubmitOptions
from .backends.slurm import SlurmOptions
from .benchmark import Config, load_tasks
from .generation import Generation
from .inference.tinymodel import build_tiny_qwen3vl
from .pipeline import run_pipeline
from .plan import RunSettings
from .project import Project
from .scan import scan_tree
from .synthetic import ERROR_PREDICTIONS, make_item, write_result_file
from .views import print_scan

DEMO_DATA = Path(__file__).with_name("demo_data")
ANSWER = "[Final Answer]: Yes"
# config -> (layout, file name, absent ids, {id: error class})
RESULT_TREE = {
    "qwen3vl_text/text_csv": ("a", "results.json", {1636, 2907, 2960, 2961, 2962},
                              {1957: "oom_text", 1635: "format_failure"}),
    "qwen3vl_resize_pic/image": ("c", "results_image_merged_with_sc.json", {1634}, {2906: "other"}),
    "qwen3vl_default_pic/mix_markdown": ("b", "results.json", {1958, 1959, 2961}, {1638: "oom_image"}),
}


def render_table_image(csv_path: Path, png_path: Path) -> None:
    """A plain picture of the table: one text cell per column, rows top to bottom."""
    with open(csv_path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))[:60]
    columns = max(len(r) for r in rows)
    width = min(140 * columns, 2400)
    cell = width // columns
    image = Image.new("RGB", (width, 22 * len(rows) + 10), "white")
    draw = ImageDraw.Draw(image)
    for y, row in enumerate(rows):
        for x, value in enumerate(row):
            draw.text((4 + x * cell, 5 + y * 22), value[: cell // 7], fill="black")
        draw.line([(0, 22 * y + 2), (width, 22 * y + 2)], fill="#bbbbbb")
    image.save(png_path)


def write_demo(directory: str | Path, console=None) -> dict[str, Path]:
    """Write the demo benchmark, result tree and tiny model under ``directory``; returns their paths."""
    root = Path(directory)
    if root.exists():
        shutil.rmtree(root)
    data = root / "data"
    shutil.copytree(DEMO_DATA, data, ignore=shutil.ignore_patterns("QA_demo.json"))
    shutil.copy(DEMO_DATA / "QA_demo.json", root / "QA_demo.json")
    (data / "image").mkdir()
    for table in sorted((data / "csv").glob("*.csv")):
        render_table_image(table, data / "image" / f"{table.stem}.png")
    tasks = load_tasks(root / "QA_demo.json")
    results = root / "results"
    for name, (layout, file_name, absent, errors) in RESULT_TREE.items():
        items = [make_item(task, ERROR_PREDICTIONS[errors[task.id]] if task.id in errors else "an earlier answer")
                 for task in tasks.values() if task.id not in absent]
        items.reverse()  # the users' files are not always sorted
        write_result_file(results / name / file_name, layout, Config.parse(name), items)
    if console is not None:
        console.print(f"demo benchmark written to {root} ({len(tasks)} tasks, {len(RESULT_TREE)} configurations); "
                      "building the tiny model...", highlight=False)
    model = build_tiny_qwen3vl(root / "model", answer=ANSWER)
    return {"root": root, "data": data, "tasks": root / "QA_demo.json", "results": results, "model": model}


def run_demo(directory: Path, executor: str, dev_cluster_profile: Path, console) -> int:
    """Write the demo, scan it, ``run`` it (two shards, greedy, 16 new tokens) and scan again; returns the
    runnable gaps left (0: every gap whose source files exist was filled)."""
    paths = write_demo(directory, console)
    tasks = load_tasks(paths["tasks"])
    before = scan_tree(paths["results"], tasks, paths["tasks"], paths["data"])
    console.print("[bold]before:[/bold]")
    print_scan(before, console=console)
    # On Slurm the demo asks for what the dev cluster has (slurm/dev-cluster: partition debug, 4 fake GPUs);
    # the local executor has no use for Slurm options.
    settings = RunSettings(model=str(paths["model"]), generation=Generation.greedy(16))
    run_pipeline(before, Project().variant, settings, logs=Path(directory) / "logs", executor=executor,
                 options=SubmitOptions(slurm=SlurmOptions.resolve({}, dev_cluster_profile), parallel=2), shards=2,
                 target_hours=None,
                 max_attempts=2, console=console, poll_s=1.0)
    after = scan_tree(paths["results"], tasks, paths["tasks"], paths["data"])
    console.print("[bold]after:[/bold]")
    print_scan(after, console=console)
    left = sum(len(c.runnable) for c in after.configs)
    console.print(f"runnable gaps left: {left} (the rest need source files that do not exist)", highlight=False)
    return left
