"""Time `scan` on a full-size synthetic tree against plain json.load of the same files, side by side.

    .venv/bin/python bench/scan_speed.py [--repeat 5]

Builds 15 configurations x 3071 real tasks (~30 MB of result files, a few errors and gaps each) and a
data root, then alternates: json.load of every result file, and the whole scan (discovery, parsing,
classification, source-file checks). Prints the medians and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from hpc_rerun.benchmark import load_tasks
from hpc_rerun.scan import discover_configs, scan_tree

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the tests' tree builder
from tests.trees import write_full_size_tree  # noqa: E402

TASKS = Path(__file__).resolve().parent.parent / "tests/fixtures/realhitbench-mini/QA_final_sc_filled.json"
def time_json_load(files: list[Path]) -> float:
    start = time.perf_counter()
    for path in files:
        with open(path, "rb") as fh:
            json.load(fh)
    return time.perf_counter() - start


def time_scan(tree: Path, data_root: Path) -> float:
    start = time.perf_counter()
    tasks = load_tasks(TASKS)
    report = scan_tree(tree, tasks, TASKS, data_root)
    elapsed = time.perf_counter() - start
    assert len(report.configs) == 15 and not report.problems
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tree, data_root = write_full_size_tree(Path(tmp), load_tasks(TASKS))
        files = sorted(discover_configs(tree)[0].values())
        size_mb = sum(f.stat().st_size for f in files) / 1e6
        loads, scans = [], []
        time_scan(tree, data_root)  # warm the page cache for both
        for _ in range(args.repeat):
            loads.append(time_json_load(files))
            scans.append(time_scan(tree, data_root))
    load_s, scan_s = statistics.median(loads), statistics.median(scans)
    print(f"tree: {len(files)} result files, {size_mb:.1f} MB, 3071 tasks each")
    print(f"json.load of every file : {load_s * 1000:8.1f} ms (median of {args.repeat})")
    print(f"hpc-rerun scan (all)    : {scan_s * 1000:8.1f} ms (median of {args.repeat})")
    print(f"scan / json.load        : {scan_s / load_s:8.2f}x (target <= 2.0x)")


if __name__ == "__main__":
    main()
