"""Synthetic trees for tests and benchmarks: a data root of empty source files, and the users' full-size
evaluation (15 configurations x every task) as result files."""

from __future__ import annotations

import random
from pathlib import Path

from hpc_rerun.benchmark import FORMATS, IMAGE_DIR, IMAGE_EXT, XLSX_DIR, XLSX_EXT, Config, Task
from hpc_rerun.synthetic import ERROR_PREDICTIONS, make_item, write_result_file


def write_data_root(root: Path, tasks: dict[int, Task], missing: set[str] = frozenset()) -> Path:
    """Create every source file the tasks can need (empty files), except the relative paths in ``missing``."""
    folders = [(IMAGE_DIR, IMAGE_EXT), (XLSX_DIR, XLSX_EXT), *FORMATS.values()]
    names = {t.file_name for t in tasks.values()}
    for folder, ext in folders:
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            rel = f"{folder}/{name}{ext}"
            if rel not in missing:
                (root / rel).touch()
    return root


# The 15 configurations of the users' evaluation (5 text formats, image and 4 mixes per picture variant).
FULL_SIZE_CONFIGS = (
    [f"qwen3vl_text/text_{f}" for f in ("latex", "html", "csv", "markdown", "json")]
    + ["qwen3vl_default_pic/image"] + [f"qwen3vl_default_pic/mix_{f}" for f in ("latex", "html", "csv", "markdown")]
    + ["qwen3vl_resize_pic/image"] + [f"qwen3vl_resize_pic/mix_{f}" for f in ("html", "csv", "markdown", "json")]
)


def write_full_size_tree(root: Path, tasks: dict[int, Task], seed: int = 0) -> tuple[Path, Path]:
    """15 configurations x every task (~30 MB for the real 3071), ~0.3% absent and ~0.7% errors each,
    layouts a, b, c in turn; plus a data root. Returns (results root, data root)."""
    rng = random.Random(seed)
    words = "the total employment year sector rate growth value table column row answer".split()
    errors = list(ERROR_PREDICTIONS.values())
    for n, name in enumerate(FULL_SIZE_CONFIGS):
        items = []
        for task in tasks.values():
            roll = rng.random()
            if roll < 0.003:
                continue  # absent
            prediction = (rng.choice(errors) if roll < 0.01
                          else " ".join(rng.choice(words) for _ in range(rng.randint(3, 40))))
            items.append(make_item(task, prediction, processing_time=round(rng.uniform(0.5, 30), 2)))
        write_result_file(root / "tree" / name / "results.json", "abc"[n % 3], Config.parse(name), items)
    data_root = write_data_root(root / "data", tasks, {"html/labor-table68.html", "json/health-table09.json"})
    return root / "tree", data_root
