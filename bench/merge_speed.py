"""Time and measure merge-shards on a full-size tree against loading and dumping the same files.

    .venv/bin/python bench/merge_speed.py [--repeat 3]

Builds 15 configurations x 3071 real tasks (~30 MB) and a run whose shards answer every error and
absent id (~1% of each file). Alternates, on fresh copies: (a) json.load + json.dump (the format the
files use) of every result file, (b) the whole merge (lock, records, best-of, rewrite, aggregates,
backups, atomic writes). Memory: peak Python allocations (tracemalloc) of the merge against the
largest file's size on disk and against json.load of that file alone.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from hpc_rerun.atomic import dump_json
from hpc_rerun.benchmark import load_tasks
from hpc_rerun.merge import merge
from hpc_rerun.results import item_ok, load_result_file
from hpc_rerun.rundir import RecordWriter, RunDir
from hpc_rerun.scan import discover_configs
from hpc_rerun.synthetic import make_item

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the tests' tree builder
from tests.trees import write_full_size_tree  # noqa: E402

TASKS = Path(__file__).resolve().parent.parent / "tests/fixtures/realhitbench-mini/QA_final_sc_filled.json"


def write_run(run_dir: Path, tree: Path, tasks) -> int:
    """A run whose shards answer every gap of every file (what a finished rerun brings back)."""
    count = 0
    (run_dir / "attempt-1").mkdir(parents=True)
    with RecordWriter(run_dir / "attempt-1" / "shard-0000.jsonl") as writer:
        for config, path in discover_configs(tree)[0].items():
            done = {i["id"] for i in load_result_file(path).items if item_ok(i)}
            for task in tasks.values():
                if task.id not in done:
                    record = make_item(task, "a fresh answer")
                    record["provenance"] = {"config": config.name, "run_id": "bench", "attempt": 1, "shard": 0}
                    writer.append(record)
                    count += 1
    return count


def load_and_dump(files: list[Path]) -> float:
    start = time.perf_counter()
    for path in files:
        with open(path, "rb") as fh:
            data = json.load(fh)
        path.write_bytes(dump_json(data))
    return time.perf_counter() - start


def run_merge(tree: Path, run_dir: Path) -> float:
    start = time.perf_counter()
    files = {c.name: p for c, p in discover_configs(tree)[0].items()}
    reports = merge(files, RunDir(run_dir).records(), results_root=tree, run=RunDir(run_dir))
    elapsed = time.perf_counter() - start
    assert all(r.changed and not r.problem for r in reports), reports
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    tasks = load_tasks(TASKS)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pristine, _ = write_full_size_tree(tmp / "pristine", tasks)
        run_dir = tmp / "run"
        records = write_run(run_dir, pristine, tasks)
        files = sorted(discover_configs(pristine)[0].values())
        largest = max(files, key=lambda p: p.stat().st_size)
        largest_mb = largest.stat().st_size / 1e6
        baseline, merges = [], []
        for n in range(args.repeat):
            for name, timings, action in (("a", baseline, None), ("b", merges, run_merge)):
                work = tmp / f"{name}{n}"
                shutil.copytree(pristine, work)
                if action is None:
                    timings.append(load_and_dump(sorted(discover_configs(work)[0].values())))
                else:
                    (run_dir / "merged.json").unlink(missing_ok=True)
                    timings.append(action(work, run_dir))
                shutil.rmtree(work)
        work = tmp / "mem"
        shutil.copytree(pristine, work)
        tracemalloc.start()
        run_merge(work, run_dir)
        merge_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        with open(largest, "rb") as fh:
            json.load(fh)
        load_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    base, ours = statistics.median(baseline), statistics.median(merges)
    print(f"tree: {len(files)} result files, {records} records to merge")
    print(f"json.load + json.dump, every file : {base * 1000:8.1f} ms (median of {args.repeat})")
    print(f"merge-shards (all)                : {ours * 1000:8.1f} ms (median of {args.repeat})")
    print(f"merge / load+dump                 : {ours / base:8.2f}x (target <= 2.0x)")
    print(f"largest result file on disk       : {largest_mb:8.1f} MB")
    print(f"merge peak Python memory          : {merge_peak / 1e6:8.1f} MB")
    print(f"json.load of the largest file     : {load_peak / 1e6:8.1f} MB peak")
    print(f"merge peak / json.load largest    : {merge_peak / load_peak:8.2f}x (target <= 3.0x)")


if __name__ == "__main__":
    main()
