"""The users' real gaps, end to end on one card: scan -> plan -> shard spec -> the worker, against the seed's way.

    python bench/gaps_e2e.py --processor DIR [--out DIR] [--total-gib 80] [--new-tokens 128]

Tables shaped like the real gaps (docs/facts.md), scaled to fit one device call: a 4 MB HTML
table of 90,000 lines, a 2.6 MB Markdown table of 32 lines of 83K characters, a 1.4 MB CSV table of 32 lines
(238K tokens: under the context), a short LaTeX table, a table image of 5 MP, and an image+HTML task of the
resize_pic variant. Ten gaps, written as a result tree with those ids absent, found by ``scan``, costed and
sharded by ``plan`` (one shard), run by the worker in this process (what ``hpc-rerun worker`` runs) with a
random Qwen3-VL-8B of the real dimensions, the real Qwen vocabulary (``--processor``: a folder made by
bench/qwen_vocab.py) and Qwen3-VL-8B-Instruct's own generation_config (sampling, repetition_penalty 1.0,
its end tokens); only the answer length is scaled: exactly ``--new-tokens`` per task (random weights never
stop by themselves). Batches and the prompt budget are planned for a ``--total-gib`` card.

Prints: wall time, time to first batch after the model is loaded, GPU busy fraction from the first batch to
the end, prompt-preparation time, tasks/s, truncations, peak memory, long-prompt prefill rate against the
card's measured dense bf16 rate, and the seed's way (HF generate, one task at a time, the same truncated
prompts) on one task of each shape in the same process, with the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import torch
from gpu_throughput import build_and_save
from PIL import Image, ImageDraw

from hpc_rerun.benchmark import Config, load_tasks
from hpc_rerun.inference import worker as worker_module
from hpc_rerun.inference.engine import GPU_MEMORY_ENV, Engine
from hpc_rerun.plan import RunnableCosts, RunSettings, pack_shards, write_run
from hpc_rerun.project import Project
from hpc_rerun.protocol import DEFAULT_PROTOCOL, PRESETS
from hpc_rerun.rundir import ShardSpec, read_records, records_path
from hpc_rerun.scan import scan_tree
from hpc_rerun.synthetic import make_item, write_result_file

# Qwen3-VL-8B-Instruct's generation_config.json, with the real Qwen ids.
QWEN3_VL_GENERATION = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.0,
                       "bos_token_id": 151643, "pad_token_id": 151643, "eos_token_id": [151645, 151643]}
# (configuration, table, question type, tasks): the gap shapes, scaled
GAPS = [("qwen3vl_text/text_html", "economy-table14", "Structure Comprehending", 2),
        ("qwen3vl_text/text_markdown", "labor-table03", "Fact Checking", 1),
        ("qwen3vl_text/text_csv", "energy-table07", "Numerical Reasoning", 1),
        ("qwen3vl_text/text_latex", "science-table02", "Fact Checking", 2),
        ("qwen3vl_default_pic/image", "health-table05", "Fact Checking", 1),
        ("qwen3vl_resize_pic/mix_html", "society-table11", "Structure Comprehending", 2),
        ("qwen3vl_text/text_latex", "science-table02", "Numerical Reasoning", 1)]
BF16_FLOPS_PER_PARAM = 2


WORDS = ["Employed", "persons", "Total", "Agriculture", "Industry", "Services", "Region", "Male", "Female", "Urban",
         "Rural", "thousand", "percent", "Year"]


def html_table(lines: int, rng: random.Random) -> str:
    """PhpSpreadsheet-like HTML: a style block of 3.4K-character lines, then a line per row tag and cell
    (44 characters a line on average, as the real 4 MB / 90K-line table)."""
    style = [f".style{n} {{ " + "; ".join(f"border-{side}:1px solid #000000 !important" for side in
                                            ("top", "bottom", "left", "right") * 20) + " }" for n in range(40)]
    cells = []
    for n in range(lines - len(style) - 4):
        if n % 8 == 0:
            cells.append("      </tr>" if n else "      <tr>")
        elif n % 8 == 1:
            cells.append(f'      <tr class="row{n // 8}">')
        elif n % 2:
            cells.append(f'        <td class="column{n % 8} style{n % 40} null"></td>')
        else:
            content = " ".join(rng.choice(WORDS) for _ in range(2)) if n % 3 else str(rng.randint(0, 999))
            cells.append(f'        <td class="column{n % 8} style{n % 40} s">{content}</td>')
    return "<html>\n<style>\n" + "\n".join(style) + "\n</style>\n" + "\n".join(cells) + "\n</html>"


def markdown_table(lines: int, chars: int, rng: random.Random) -> str:
    out = []
    for _ in range(lines):
        row, size = [], 0
        while size < chars:
            cell = (f"{rng.choice(WORDS)} {rng.randint(0, 999)}" if rng.random() < 0.9 else
                    f"{rng.randint(0, 99)}.{rng.randint(0, 9)}")
            row.append(cell)
            size += len(cell) + 3
        out.append("| " + " | ".join(row) + " |")
    return "\n".join(out)


def csv_table(lines: int, chars: int, rng: random.Random) -> str:
    """Wide and sparse, like the users' 1.4 MB / 32-line CSV tables (238K tokens: under the context)."""
    out = []
    for _ in range(lines):
        row, size = [], 0
        while size < chars:
            cell = str(rng.randint(0, 999)) if rng.random() < 0.015 else ""
            row.append(cell)
            size += len(cell) + 1
        out.append(",".join(row))
    return "\n".join(out)


def table_image(path: Path, width: int, height: int) -> None:
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for y in range(0, height, 40):
        draw.line([(0, y), (width, y)], fill="black")
        for x in range(0, width, 160):
            draw.text((x + 5, y + 12), f"{(x * 7 + y) % 9973}", fill="black")
    image.save(path)


def write_benchmark(root: Path, rng: random.Random, copies: int = 1) -> tuple[Path, Path, Path]:
    """The gap tree: each shape's tables, tasks and result files; ``copies`` > 1 repeats every shape with its
    own tables (``<table>-2`` ...), for runs split over several GPUs."""
    data = root / "data"
    for folder in ("html", "markdown", "csv", "latex", "image"):
        (data / folder).mkdir(parents=True, exist_ok=True)
    for copy in range(1, copies + 1):
        suffix = f"-{copy}" if copy > 1 else ""
        (data / "html" / f"economy-table14{suffix}.html").write_text(html_table(90_000, rng))
        (data / "html" / f"society-table11{suffix}.html").write_text(html_table(321, rng))
        (data / "markdown" / f"labor-table03{suffix}.md").write_text(markdown_table(32, 83_000, rng))
        (data / "csv" / f"energy-table07{suffix}.csv").write_text(csv_table(32, 44_000, rng))
        (data / "latex" / f"science-table02{suffix}.txt").write_text(
            "\\begin{tabular}{lrr}\n" + "\n".join(f"row {n} & {n * 3} & {n * 7} \\\\" for n in range(40))
            + "\n\\end{tabular}")
        table_image(data / "image" / f"health-table05{suffix}.png", 2600, 1920)  # 5.0 MP
        table_image(data / "image" / f"society-table11{suffix}.png", 1600, 1200)
    queries, gaps = [], {}
    for copy in range(1, copies + 1):
        suffix = f"-{copy}" if copy > 1 else ""
        for config, table, question_type, count in GAPS:
            for number in range(count + 1):  # one answered task per shape, the rest are the gaps
                queries.append({"id": len(queries) + 1, "FileName": table + suffix, "QuestionType": question_type,
                                "SubQType": None, "FinalAnswer": "1", "ProcessedAnswer": "1",
                                "Question": f"What is the value in row {rng.randint(1, 99)} "
                                            f"of column {rng.randint(1, 9)}?"})
                if number:
                    gaps.setdefault(config, set()).add(queries[-1]["id"])
    task_list = root / "QA_final_sc_filled.json"
    task_list.write_text(json.dumps({"queries": queries}))
    tasks = load_tasks(task_list)
    tree = root / "results"
    for config, missing in gaps.items():  # every other task of the list answered: only the gaps are absent
        answered = [make_item(task, "[Final Answer]: 1", 40.0) for task in tasks.values() if task.id not in missing]
        write_result_file(tree / config / "results.json", "b", Config.parse(config), answered)
    return tree, data, task_list


class TimedRunner(worker_module.ShardRunner):
    """The worker as it is, with the GPU work of each batch and the CPU work of each prompt timed."""

    def __init__(self, spec_path):
        super().__init__(spec_path)
        self.batches, self.prepare_s, self.prepared = [], 0.0, []

    def prepare(self, ti):
        start = time.perf_counter()
        try:
            return super().prepare(ti)
        finally:
            self.prepare_s += time.perf_counter() - start
            self.prepared.append(ti)

    def run_batch(self, batch, writer):
        torch.cuda.synchronize()
        peak_before = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        super().run_batch(batch, writer)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        self.peak = max(getattr(self, "peak", 0), peak, peak_before)
        self.batches.append({"start": start, "end": time.perf_counter(), "tasks": len(batch),
                             "peak_gib": round(peak / 1024**3, 1),
                             "prompt_tokens": [ti.request.prompt_tokens for ti in batch],
                             "configs": [ti.config.name for ti in batch]})


def seed_way(engine: Engine, request) -> float:
    """The seed's way: the processor and HF generate on one task (the same truncated prompt); seconds."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    inputs = {k: v.to(engine.device) if hasattr(v, "to") else v for k, v in engine._process([request]).items()}
    with torch.inference_mode():
        engine.model.generate(**inputs, **request.generation)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def prefill_flops(parameters: int, tokens: int, config) -> float:
    """Matrix products (2 x parameters per token) plus causal attention over the prompt."""
    text = config.text_config
    attention = 2 * tokens * tokens * text.num_attention_heads * text.head_dim * text.num_hidden_layers
    return BF16_FLOPS_PER_PARAM * parameters * tokens + attention


def long_prefill(engine: Engine, runner: TimedRunner, report: dict) -> None:
    """Long-prompt prefill rate: the longest prompt alone, prefill and one new token, against the card."""
    request = max((ti.request for ti in runner.prepared if ti.request is not None), key=lambda r: r.prompt_tokens)
    tokens = request.prompt_tokens
    report["long_prefill"] = {"prompt_tokens": tokens}
    one = dict(request.generation, max_new_tokens=1, min_new_tokens=1)
    encoded = engine.encode([request])
    encoded.sampling = engine.sampling(one)
    torch.cuda.synchronize()
    begin = time.perf_counter()
    engine.generate_ids(encoded)
    torch.cuda.synchronize()
    prefill_s = time.perf_counter() - begin
    flops = prefill_flops(report["build"]["parameters"], tokens, engine.model.config)
    report["long_prefill"].update(prefill_s=round(prefill_s, 1), tflops=round(flops / prefill_s / 1e12, 1),
                                  fraction_of_matmul_rate=round(flops / prefill_s / 1e12 / report["matmul_tflops"], 3))
    print(json.dumps(report.get("long_prefill"), indent=2), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processor", type=Path, required=True, help="made by bench/qwen_vocab.py")
    parser.add_argument("--work", type=Path, default=Path("/tmp/gaps-e2e"))
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    parser.add_argument("--total-gib", type=float, default=80.0)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--skip-seed", action="store_true")
    parser.add_argument("--skip-long-prefill", action="store_true")
    parser.add_argument("--protocol", default=DEFAULT_PROTOCOL, choices=sorted(PRESETS),
                        help="the answer protocol of every configuration (random weights never write the marker: "
                             "the users' protocols ask again, 3 generations a task; hpc-rerun's asks once)")
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    report = {"card": torch.cuda.get_device_name(0), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "planned_gib": args.total_gib, "new_tokens": args.new_tokens}
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize()
    report["matmul_tflops"] = round(10 * 2 * 8192**3 / (time.perf_counter() - start) / 1e12, 1)
    del a
    rng = random.Random(0)
    model_dir = args.work / "qwen3vl-8b-random"
    report["build"] = build_and_save(args.processor, model_dir)
    (model_dir / "generation_config.json").write_text(json.dumps(QWEN3_VL_GENERATION))
    tree, data, task_list = write_benchmark(args.work, rng)
    tasks = load_tasks(task_list)
    report_scan = scan_tree(tree, tasks, task_list, data)
    project = Project()
    generation = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens}  # the model's own, else
    start = time.perf_counter()
    costs = RunnableCosts(report_scan, project.variant, str(model_dir), generation).costs()
    report["plan_s"] = round(time.perf_counter() - start, 1)
    protocols = {config: args.protocol for config, *_ in GAPS}
    report["answer_protocol"] = args.protocol
    run = write_run(args.work / "logs", report_scan, pack_shards(costs, 1), RunSettings(
        model=str(model_dir), generation=generation, answer_protocols=protocols), project.variant, {})
    first = run.attempt(1)
    spec_path = first.spec_file(first.shards[0])
    report["tasks"] = len(ShardSpec.read(spec_path).tasks)
    report["plan_estimate_s"] = round(sum(c.seconds for c in costs), 1)

    os.environ[GPU_MEMORY_ENV] = str(args.total_gib)
    loaded = {}
    real_engine = worker_module.Engine

    def engine_timed(*a, **k):
        engine = real_engine(*a, **k)
        torch.cuda.synchronize()
        loaded["at"], loaded["engine"] = time.perf_counter(), engine
        return engine

    worker_module.Engine = engine_timed
    torch.cuda.reset_peak_memory_stats()
    runner = TimedRunner(spec_path)
    start = time.perf_counter()
    runner.run()
    wall = time.perf_counter() - start
    worker_module.Engine = real_engine
    engine = loaded["engine"]
    batches = runner.batches
    busy = sum(b["end"] - b["start"] for b in batches)
    span = batches[-1]["end"] - batches[0]["start"]
    records = read_records(records_path(spec_path))
    truncations = {}
    for record in records:
        cut = (record["provenance"].get("truncation") or {}).get("rule") or "whole"
        truncations[cut] = truncations.get(cut, 0) + 1
    report["engine"] = {
        "wall_s": round(wall, 1), "model_load_s": round(loaded["at"] - start, 1),
        "first_batch_after_load_s": round(batches[0]["start"] - loaded["at"], 1),
        "gpu_busy_fraction": round(busy / span, 3), "gpu_s": round(busy, 1),
        "prompt_preparation_cpu_s": round(runner.prepare_s, 1), "tasks": len(records),
        "generations": sum(r["provenance"].get("generations") or 1 for r in records),  # format re-asks included
        "tasks_per_s_after_load": round(len(records) / (batches[-1]["end"] - loaded["at"]), 4),
        "truncations": truncations, "errors": sorted({r["provenance"]["error_class"] or "-" for r in records}),
        "peak_gib": round(max(runner.peak, torch.cuda.max_memory_allocated()) / 1024**3, 1),
        "prompt_budget": records[0]["provenance"]["prompt_budget"],
        "prefill_tokens": engine.packed.stats["prompt_tokens"],
        "prefill_tokens_shared": engine.packed.stats["shared_tokens"],
        "max_prompt_tokens": max(max(b["prompt_tokens"]) for b in batches),
        "batches": [{k: (round(v, 2) if isinstance(v, float) else v) for k, v in b.items() if k != "start"}
                    | {"seconds": round(b["end"] - b["start"], 1)} for b in batches]}
    for b in report["engine"]["batches"]:
        b.pop("end", None)
    report["engine"]["peak_gib_by_batch"] = [b["peak_gib"] for b in batches]
    print(json.dumps(report, indent=2), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gaps_e2e.json").write_text(json.dumps(report, indent=2))  # again at the end: what got done

    by_config = {}
    for ti in runner.prepared:
        if ti.request is not None:
            by_config.setdefault(ti.config.name, ti.request)
    if not args.skip_long_prefill:
        long_prefill(engine, runner, report)

    if not args.skip_seed:
        # The seed's way is HF generate as the users ran it: on the whole card, not under the cap the engine puts
        # on PyTorch's allocator for the planned card (under it, eager attention over 244K-262K tokens runs out).
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0, torch.cuda.current_device())
        smallest = min((ti.request for ti in runner.prepared if ti.request), key=lambda r: r.prompt_tokens)
        seed_way(engine, smallest)  # warm-up: HF generate's first call sets up kernels and handles
        seed = {}
        for config, request in by_config.items():
            try:
                seed[config] = {"seconds": round(seed_way(engine, request), 1), "prompt_tokens": request.prompt_tokens}
            except torch.OutOfMemoryError:
                seed[config] = {"error": "out of memory"}
                torch.cuda.empty_cache()
            print(config, seed[config], flush=True)
            (args.out / "gaps_e2e.json").write_text(json.dumps(dict(report, seed_way=seed), indent=2))
        report["seed_way"] = seed
        per_shape = {c: s["seconds"] for c, s in seed.items() if "seconds" in s}
        counts = {}
        for record in records:  # the users' script asks again too (the same protocol): each generation counts
            config = record["provenance"]["config"]
            counts[config] = counts.get(config, 0) + (record["provenance"].get("generations") or 1)
        if set(counts) <= set(per_shape):
            seed_total = sum(per_shape[c] * n for c, n in counts.items())
            engine_total = batches[-1]["end"] - batches[0]["start"]
            report["seed_way_estimated_total_s"] = round(seed_total, 1)
            report["speedup"] = round(seed_total / engine_total, 2)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gaps_e2e.json").write_text(json.dumps(report, indent=2))
    e = report["engine"]
    print(f"\n{report['card']} planned as {args.total_gib} GiB: {e['tasks']} tasks in {e['wall_s']} s "
          f"(load {e['model_load_s']} s, first batch {e['first_batch_after_load_s']} s after), GPU busy "
          f"{e['gpu_busy_fraction']:.0%}, prompts {e['prompt_preparation_cpu_s']} CPU s, peak {e['peak_gib']} GiB, "
          f"truncations {e['truncations']}, largest prompt {e['max_prompt_tokens']} (budget {e['prompt_budget']}), "
          f"{e['prefill_tokens_shared']} of {e['prefill_tokens']} prompt tokens taken from a shared beginning")
    if "long_prefill" in report:
        lp = report["long_prefill"]
        print(f"long prefill: {lp['prompt_tokens']} tokens in {lp.get('prefill_s')} s = {lp.get('tflops')} TFLOP/s "
              f"({lp.get('fraction_of_matmul_rate')} of {report['matmul_tflops']})")
    if "speedup" in report:
        print(f"seed's way (per shape x tasks) {report['seed_way_estimated_total_s']} s vs engine GPU span "
              f"{round(span, 1)} s: {report['speedup']}x; plan estimated {report['plan_estimate_s']} s")


if __name__ == "__main__":
    main()
