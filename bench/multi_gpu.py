"""One node, several GPUs: the gap-shaped workload of bench/gaps_e2e.py run by `hpc-rerun run --executor local`,
a worker per GPU, against the same tasks on one GPU.

    python bench/multi_gpu.py --processor DIR [--gpus N] [--copies C] [--new-tokens 128] [--out DIR]

The gap tree of bench/gaps_e2e.py with every gap shape ``--copies`` times (its own tables; default N, so N
shards can be balanced), the random Qwen3-VL-8B with the real dimensions and vocabulary and
Qwen3-VL-8B-Instruct's generation_config. Two runs of the real command on fresh copies of the tree: one
shard with one GPU visible, then N shards with N visible. While each runs, nvidia-smi is sampled every
second (the GPUs' memory, and which process computes on which GPU).

Checks and prints: every worker on its own GPU (from inside: each shard's records name one
CUDA_VISIBLE_DEVICES and CPU share, all distinct; from outside: nvidia-smi saw one worker process per GPU),
peak memory per GPU against 80 GB, every gap answered after the merge (random weights never write a
well-formed answer, so the answers are format failures: recorded, not absent), and the throughput ratio of
N GPUs over one (the issue's bar: >= 3.6x for 4). Batches and budgets are planned for an 80 GB card
(HPC_RERUN_GPU_MEMORY_GIB), as on the users' A100s.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from gaps_e2e import QWEN3_VL_GENERATION, write_benchmark
from gpu_throughput import build_and_save

HPC_RERUN = [sys.executable, "-m", "hpc_rerun.cli"]


def gpu_ids() -> list[str]:
    out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                         text=True, check=True).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


class Sampler(threading.Thread):
    """nvidia-smi once a second: peak memory per GPU, and the GPUs each process computed on."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak_mib: dict[str, int] = {}
        self.gpus_of_pid: dict[int, set[str]] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            gpus = subprocess.run(["nvidia-smi", "--query-gpu=index,uuid,memory.used", "--format=csv,noheader,nounits"],
                                  capture_output=True, text=True).stdout
            index_of = {}
            for line in gpus.splitlines():
                index, uuid, used = (f.strip() for f in line.split(","))
                index_of[uuid] = index
                self.peak_mib[index] = max(self.peak_mib.get(index, 0), int(used))
            apps = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,gpu_uuid", "--format=csv,noheader"],
                                  capture_output=True, text=True).stdout
            for line in apps.splitlines():
                pid, uuid = (f.strip() for f in line.split(","))
                self.gpus_of_pid.setdefault(int(pid), set()).add(index_of.get(uuid, uuid))
            self.stop.wait(1.0)


def run_once(work: Path, pristine: Path, model_dir: Path, gpus: list[str], new_tokens: int) -> dict:
    """``hpc-rerun run`` on a fresh copy of the tree with ``gpus`` visible, one shard per GPU."""
    root = work / f"run-{len(gpus)}gpu"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(pristine, root)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(gpus), "HPC_RERUN_GPU_MEMORY_GIB": "80"}
    sampler = Sampler()
    sampler.start()
    start = time.perf_counter()
    proc = subprocess.run([*HPC_RERUN, "run", root / "results", "--data-root", root / "data", "--tasks",
                           root / "QA_final_sc_filled.json", "--model", model_dir, "--executor", "local",
                           "--shards", str(len(gpus)), "--max-new-tokens", str(new_tokens), "--logs", root / "logs"],
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    sampler.stop.set()
    sampler.join()
    [run_dir] = list((root / "logs").iterdir())
    records = {path.stem: [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
               for path in sorted(run_dir.glob("attempt-*/shard-*.jsonl"))}
    seen_inside = {shard: sorted({(r["provenance"]["cuda_visible_devices"], r["provenance"]["cpus"]) for r in rs})
                   for shard, rs in records.items()}
    workers = {}
    for attempt in run_dir.glob("attempt-*/local-state.json"):
        for shard, state in json.loads(attempt.read_text()).items():
            workers[shard] = {"pid": state.get("pid"), "gpu": state.get("gpu"),
                              "nvidia_smi_gpus": sorted(sampler.gpus_of_pid.get(state.get("pid"), ()))}
    scan = json.loads(subprocess.run([*HPC_RERUN, "scan", root / "results", "--data-root", root / "data", "--tasks",
                                      root / "QA_final_sc_filled.json", "--json"],
                                     capture_output=True, text=True).stdout)
    absent = sum(len(c["absent"]) for c in scan["configs"])
    errors = {cls for c in scan["configs"] for cls in c["errors"]}
    tasks = sum(len(rs) for rs in records.values())
    return {"gpus": gpus, "exit_code": proc.returncode, "wall_s": round(wall, 1), "tasks": tasks,
            "tasks_per_s": round(tasks / wall, 4),
            "peak_gib": {g: round(m / 1024, 1) for g, m in sampler.peak_mib.items()},
            "seen_inside_workers": seen_inside, "workers": workers, "absent_after_merge": absent,
            "error_classes_after_merge": sorted(errors), "stderr_tail": proc.stderr[-2000:]}


def checks(run: dict) -> dict:
    """Each worker on its own GPU, seen from inside (its records) and outside (nvidia-smi); memory; the merge."""
    inside = [pair for pairs in run["seen_inside_workers"].values() for pair in pairs]
    outside = [tuple(w["nvidia_smi_gpus"]) for w in run["workers"].values()]
    return {
        "one_gpu_per_worker_inside": all(len(p) == 1 for p in run["seen_inside_workers"].values())
        and len({gpu for gpu, _ in inside}) == len(inside) == len(run["gpus"]),
        "disjoint_cpu_shares": len({cpus for _, cpus in inside}) == len(inside),
        "one_gpu_per_worker_nvidia_smi": all(len(g) == 1 for g in outside) and len(set(outside)) == len(run["gpus"]),
        "peak_inside_80_gib": all(v <= 80 for v in run["peak_gib"].values()),
        "every_gap_answered": run["absent_after_merge"] == 0 and run["exit_code"] in (0, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processor", type=Path, required=True, help="made by bench/qwen_vocab.py")
    parser.add_argument("--gpus", type=int, help="GPUs for the parallel run [default: all]")
    parser.add_argument("--copies", type=int, help="copies of every gap shape [default: --gpus]")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--work", type=Path, default=Path("/tmp/multi-gpu"))
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = parser.parse_args()
    gpus = gpu_ids()[:args.gpus] if args.gpus else gpu_ids()
    pristine = args.work / "pristine"
    shutil.rmtree(args.work, ignore_errors=True)
    write_benchmark(pristine, random.Random(0), copies=args.copies or len(gpus))
    model_dir = args.work / "qwen3vl-8b-random"
    report = {"date": time.strftime("%Y-%m-%d"), "card": subprocess.run(
        ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
        capture_output=True, text=True).stdout.split("\n")[0],
        "build": build_and_save(args.processor, model_dir)}
    (model_dir / "generation_config.json").write_text(json.dumps(QWEN3_VL_GENERATION))
    report["one_gpu"] = run_once(args.work, pristine, model_dir, gpus[:1], args.new_tokens)
    report["one_gpu"]["checks"] = checks(report["one_gpu"])
    if len(gpus) > 1:
        report["all_gpus"] = run_once(args.work, pristine, model_dir, gpus, args.new_tokens)
        report["all_gpus"]["checks"] = checks(report["all_gpus"])
        report["throughput_ratio"] = round(report["all_gpus"]["tasks_per_s"] / report["one_gpu"]["tasks_per_s"], 2)
    print(json.dumps(report, indent=2))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "multi_gpu.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
