"""GPU throughput of the worker's engine against the seed's way, side by side, on one card.

    python bench/gpu_throughput.py --processor DIR [--out DIR] [--seed-sample 4] [--total-gib 79.6]
                                   [--cuda-graphs off,on]

A random-weight Qwen3-VL-8B with the real dimensions (docs/facts.md), bf16 on the
GPU, saved to local disk and loaded back through the engine (from_pretrained, timed against reading
the same bytes). The tokenizer/processor is the tiny model's (``hpc-rerun build-tiny-model DIR``):
prompt lengths are set in its tokens, so the workload's shapes are the same on any machine.

Workload: 64 tasks, 16 of each RealHiTBench shape: text ~3K tokens, text ~16K, image 1600x1200 +
question, image + ~3K text; exactly 128 new tokens each (min_new_tokens, greedy), so random weights
cannot stop early. The seed's way (one task at a time, batch 1, HF generate) runs on every
``--seed-sample``-th task (the same mix; the whole 64 would take ~8 minutes at b1); the engine runs all
64 as the worker does (packed batches planned for a ``--total-gib`` card, the next batch encoded while
the GPU works), with and without CUDA graphs for decoding.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import time
from pathlib import Path

import torch
from PIL import Image

from hpc_rerun.benchmark import Task
from hpc_rerun.inference.engine import Engine, Request
from hpc_rerun.inference.prompts import DEFAULT_PROMPTS, build_prompt_text

NEW_TOKENS = 128
BF16_FLOPS = 790e12  # dense bf16 matrix rate measured on the lent H200s (docs/facts.md)


def real_8b_config(processor_dir: Path):
    from transformers import AutoTokenizer, Qwen3VLConfig

    tokenizer = AutoTokenizer.from_pretrained(processor_dir)
    ids = tokenizer.convert_tokens_to_ids
    return Qwen3VLConfig(
        text_config={"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                     "max_position_embeddings": 262144, "tie_word_embeddings": False,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 5_000_000.0,
                                         "mrope_section": [24, 20, 20], "mrope_interleaved": True}},
        vision_config={"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16, "patch_size": 16,
                       "temporal_patch_size": 2, "spatial_merge_size": 2, "out_hidden_size": 4096,
                       "num_position_embeddings": 2304, "deepstack_visual_indexes": [8, 16, 24]},
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )


def build_and_save(processor_dir: Path, model_dir: Path) -> dict:
    from transformers import GenerationConfig, Qwen3VLForConditionalGeneration

    start = time.perf_counter()
    config = real_8b_config(processor_dir)
    with torch.device("cuda"):
        model = Qwen3VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.generation_config = GenerationConfig(do_sample=False)
    params = sum(p.numel() for p in model.parameters())
    built = time.perf_counter() - start
    model.save_pretrained(model_dir)
    for name in os.listdir(processor_dir):
        if not name.startswith("model") and name not in ("config.json", "generation_config.json"):
            shutil.copy(processor_dir / name, model_dir / name)
    del model
    torch.cuda.empty_cache()
    return {"parameters": params, "build_s": round(built, 1)}


def time_load(model_dir: Path) -> tuple[Engine, dict]:
    """Read the safetensors bytes, then load through the engine; same page cache state for both."""
    files = sorted(model_dir.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    start = time.perf_counter()
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(1 << 26):
                pass
    read_s = time.perf_counter() - start
    start = time.perf_counter()
    engine = Engine(str(model_dir), dtype="bfloat16")
    torch.cuda.synchronize()
    load_s = time.perf_counter() - start
    return engine, {"bytes": size, "read_s": round(read_s, 2), "load_s": round(load_s, 2),
                    "load_over_read": round(load_s / read_s, 2)}


def table_of(tokenizer, target_tokens: int, rng: random.Random) -> str:
    """A CSV table of about ``target_tokens`` tokens with random numbers."""
    header = "Year,Region,Sector,Employment,Output,Growth\n"
    rows, text = [], header
    while True:
        rows.append(f"{rng.randint(1950, 2020)},R{rng.randint(1, 99)},S{rng.randint(1, 40)},"
                    f"{rng.randint(100, 99999)},{rng.random() * 1e4:.2f},{rng.random():.3f}")
        if len(rows) % 50 == 0:
            text = header + "\n".join(rows)
            if len(tokenizer(text)["input_ids"]) >= target_tokens:
                return text


def workload(engine: Engine, rng: random.Random) -> list[tuple[str, Request]]:
    task = Task(1, "bench-table01", "Numerical Reasoning", "Calculation",
                "What is the total employment of sector S7 over all years?", "0")
    greedy = {"do_sample": False, "max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS}
    tok = engine.tokenizer
    requests = []
    for _ in range(16):
        requests.append(("text-3k", Request(build_prompt_text(task, "text", "csv", table_of(tok, 3000, rng),
                                                              DEFAULT_PROMPTS), None, greedy)))
        requests.append(("text-16k", Request(build_prompt_text(task, "text", "csv", table_of(tok, 16000, rng),
                                                               DEFAULT_PROMPTS), None, greedy)))
        noise = Image.frombytes("RGB", (1600, 1200), rng.randbytes(1600 * 1200 * 3))
        image = engine.fit_image(noise, None, None)
        requests.append(("image", Request(build_prompt_text(task, "image", None, None, DEFAULT_PROMPTS), image,
                                          greedy)))
        requests.append(("image+text-3k", Request(build_prompt_text(task, "mix", "csv", table_of(tok, 3000, rng),
                                                                    DEFAULT_PROMPTS), image, greedy)))
    for _, request in requests:
        request.prompt_tokens = prepared(engine, request).prompt_tokens
    return requests


def prepared(engine: Engine, request: Request) -> Request:
    """The worker's preparation of a whole prompt (no table to cut): ids, rope positions, image patches."""
    return engine.prepare(request.text, request.image, request.generation, budget=1 << 40)


def seed_way(engine: Engine, request: Request) -> list[int]:
    """The seed's way: the processor and HF generate, one task at a time (the new token ids)."""
    inputs = {k: v.to(engine.device) if hasattr(v, "to") else v for k, v in engine._process([request]).items()}
    with torch.inference_mode():
        out = engine.model.generate(**inputs, **request.generation)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def run_seed_way(engine: Engine, requests: list[Request]) -> tuple[float, list[list[int]]]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    answers = [seed_way(engine, request) for request in requests]
    torch.cuda.synchronize()
    return time.perf_counter() - start, answers


def run_engine(engine: Engine, requests: list[Request], total_gib: float, new_tokens: int | None = None
               ) -> tuple[float, list[list[Request]], dict]:
    """The worker's way over all requests (its planner, its pipeline); ``new_tokens=1`` times the
    prefill alone. Returns seconds, the batches and each request's answer."""
    if new_tokens is not None:
        requests = [Request(r.text, r.image, dict(r.generation, max_new_tokens=new_tokens, min_new_tokens=new_tokens),
                            r.prompt_tokens) for r in requests]
    answers, batches, failed = {}, [], []
    torch.cuda.synchronize()
    start = time.perf_counter()
    ready = {}

    def prepare(request: Request) -> Request:  # on the engine's threads, as the worker prepares
        ready[id(request)] = prepared(engine, request)
        return ready[id(request)]

    for batch in engine.stream_batches(requests, prepare, lambda r, err: failed.append(err), requests[0].generation,
                                       total_gib=total_gib):
        batches.append(batch)
        answers.update(zip(map(id, batch), engine.generate_ids(engine.encode([ready[id(r)] for r in batch]))))
    torch.cuda.synchronize()
    assert len(answers) == len(requests) and not failed, failed
    return time.perf_counter() - start, batches, answers


def agreement(seed: list[list[int]], engine: list[list[int]]) -> dict:
    """bf16 with random weights: near-ties flip tokens (and then everything after), so report how far
    the token ids agree: identical sequences, same first token, mean common prefix."""
    prefix = [len(os.path.commonprefix([a, b])) for a, b in zip(seed, engine)]
    return {"identical": sum(a == b for a, b in zip(seed, engine)), "of": len(seed),
            "same_first_token": sum(a[:1] == b[:1] for a, b in zip(seed, engine)),
            "mean_common_prefix_tokens": round(statistics.mean(prefix), 1)}


def text_3k_against_ceiling(engine: Engine, args, rng: random.Random, parameters: int) -> dict:
    """The stretch goal's measure: the engine on text-3k tasks only, against the compute-bound ceiling
    of docs/facts.md (2 x parameters x (prompt + new) FLOP per task at 790 TFLOP/s)."""
    task = Task(1, "bench-table01", "Numerical Reasoning", "Calculation",
                "What is the total employment of sector S7 over all years?", "0")
    greedy = {"do_sample": False, "max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS}
    requests = [Request(build_prompt_text(task, "text", "csv", table_of(engine.tokenizer, 3000, rng), DEFAULT_PROMPTS),
                        None, greedy) for _ in range(args.ceiling_tasks)]
    for request in requests:
        request.prompt_tokens = prepared(engine, request).prompt_tokens
    engine.packed.cuda_graphs = True
    seconds, batches, _ = run_engine(engine, requests, args.total_gib)
    prompt = statistics.mean(r.prompt_tokens for r in requests)
    ceiling = BF16_FLOPS / (2 * parameters * (prompt + NEW_TOKENS))
    rate = len(requests) / seconds
    return {"tasks": len(requests), "mean_prompt_tokens": round(prompt), "batches": [len(b) for b in batches],
            "seconds": round(seconds, 1), "tasks_per_s": round(rate, 2), "ceiling_tasks_per_s": round(ceiling, 1),
            "fraction_of_ceiling": round(rate / ceiling, 3)}


def compare_key_pieces(engine: Engine, requests: list[Request], args, seed_rate: float) -> list[dict]:
    """The whole workload (CUDA graphs on) at other decode key-piece sizes than the default."""
    from hpc_rerun.inference.engine import generator

    default, rows = generator.KEY_PIECE, []
    engine.packed.cuda_graphs = True
    for size in [int(x) for x in args.key_pieces.split(",") if x and int(x) != default]:
        generator.KEY_PIECE = size
        seconds, _, _ = run_engine(engine, requests, args.total_gib)
        rows.append({"key_piece": size, "seconds": round(seconds, 1),
                     "speedup": round(len(requests) / seconds / seed_rate, 2)})
        print(json.dumps(rows[-1]), flush=True)
    generator.KEY_PIECE = default
    return rows


def profile_prefill(engine: Engine, requests: list[Request], args) -> None:
    """Where the prefill's GPU time goes: torch.profiler over the whole workload at one new token."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run_engine(engine, requests, args.total_gib, new_tokens=1)
    averages = prof.key_averages()
    try:
        table = averages.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=70)
    except (AttributeError, KeyError):  # older torch names it after CUDA
        table = averages.table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile_prefill.txt").write_text(table)
    print(table[:6000], flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processor", type=Path, required=True, help="a tiny model folder (its processor is used)")
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/qwen3vl-8b-random"))
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    parser.add_argument("--seed-sample", type=int, default=4, help="the seed's way runs every N-th task")
    parser.add_argument("--total-gib", type=float, default=79.6,
                        help="plan batches for a card of this size (79.6: an 80 GB H100, the target's limit)")
    parser.add_argument("--cuda-graphs", default="off,on", help="decode modes to compare: off, on or both")
    parser.add_argument("--key-pieces", default="", help="other decode key-piece sizes to time, e.g. 1024,4096")
    parser.add_argument("--profile", action="store_true", help="profile the prefill; table in profile_prefill.txt")
    parser.add_argument("--ceiling-tasks", type=int, default=64,
                        help="text-3k tasks for the run against the compute-bound ceiling (0: skip)")
    args = parser.parse_args()
    report = {"card": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "new_tokens": NEW_TOKENS}
    import transformers

    report["transformers"] = transformers.__version__
    report["build"] = build_and_save(args.processor, args.model_dir)
    engine, report["load"] = time_load(args.model_dir)
    rng = random.Random(0)
    requests = workload(engine, rng)
    report["prompt_tokens"] = {kind: statistics.mean(r.prompt_tokens for k, r in requests if k == kind)
                               for kind in ("text-3k", "text-16k", "image", "image+text-3k")}
    report["attention"] = engine.packed.attention.name
    report["flash_schema"] = str(torch.ops.aten._flash_attention_forward.default._schema)
    seed_way(engine, requests[0][1])  # warm-up: kernels, allocator, cuBLAS handles
    engine.generate_encoded(engine.encode([r for _, r in requests[:4]]))
    start = time.perf_counter()
    engine.encode([r for _, r in requests])
    report["encode_all_s"] = round(time.perf_counter() - start, 2)  # the processor's CPU work, for reference
    torch.cuda.reset_peak_memory_stats()
    sample = [r for _, r in requests[::args.seed_sample]]
    seed_s, seed_answers = run_seed_way(engine, sample)
    seed_peak = torch.cuda.max_memory_allocated() / 1024**3
    seed_rate = len(sample) / seed_s
    report["seed_way"] = {"tasks": len(sample), "seconds": round(seed_s, 1), "tasks_per_s": round(seed_rate, 3),
                          "peak_gib": round(seed_peak, 1)}
    print(json.dumps(report, indent=2), flush=True)
    report["engine"] = []
    answers_by_mode = {}
    for graphs in [g == "on" for g in args.cuda_graphs.split(",")]:
        engine.packed.cuda_graphs = graphs
        engine.generate_encoded(engine.encode([r for _, r in requests[:4]]))  # warm-up of this mode
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        everything = [r for _, r in requests]
        try:
            engine_s, batches, answers = run_engine(engine, everything, args.total_gib)
        except Exception as err:  # keep the run: report what failed and go on
            report["engine"].append({"cuda_graphs": graphs, "error": f"{type(err).__name__}: {err}"})
            print(json.dumps(report["engine"][-1]), flush=True)
            continue
        engine_peak = torch.cuda.max_memory_allocated() / 1024**3
        engine_rate = len(everything) / engine_s
        answers_by_mode[engine.packed.cuda_graphs] = [answers[id(r)] for r in everything]
        prefill_s, _, _ = run_engine(engine, everything, args.total_gib, new_tokens=1)
        report["engine"].append({
            "cuda_graphs": engine.packed.cuda_graphs, "memory_limit_gib": args.total_gib,
            "batches": [len(b) for b in batches], "batch_tokens": [sum(r.prompt_tokens + NEW_TOKENS for r in b)
                                                                   for b in batches],
            "tasks": len(everything), "seconds": round(engine_s, 1), "prefill_only_s": round(prefill_s, 1),
            "tasks_per_s": round(engine_rate, 3), "peak_gib": round(engine_peak, 1),
            "speedup": round(engine_rate / seed_rate, 2),
            "agreement_with_seed": agreement(seed_answers, [answers[id(r)] for r in sample])})
        print(json.dumps(report["engine"][-1]), flush=True)
    if len(answers_by_mode) == 2:  # same kernels, replayed or launched one by one: the same tokens
        report["cuda_graphs_equal_eager"] = answers_by_mode[True] == answers_by_mode[False]
    report["key_pieces"] = compare_key_pieces(engine, [r for _, r in requests], args, seed_rate)
    if args.profile:
        profile_prefill(engine, [r for _, r in requests], args)
    if args.ceiling_tasks:
        report["text_3k_ceiling"] = text_3k_against_ceiling(engine, args, rng, report["build"]["parameters"])
        print(json.dumps(report["text_3k_ceiling"]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_throughput.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(f"\n{report['card']}: seed's way {seed_rate:.3f} tasks/s; load {report['load']['load_over_read']}x read")
    for row in report["engine"]:
        if "error" in row:
            print(f"  engine, CUDA graphs {row['cuda_graphs']}: {row['error']}")
            continue
        print(f"  engine, CUDA graphs {row['cuda_graphs']}: {row['tasks_per_s']:.3f} tasks/s, {row['speedup']}x, "
              f"peak {row['peak_gib']} GiB, prefill alone {row['prefill_only_s']} of {row['seconds']} s")
    if "text_3k_ceiling" in report:
        row = report["text_3k_ceiling"]
        print(f"  engine on {row['tasks']} text-3k tasks: {row['tasks_per_s']} tasks/s = "
              f"{row['fraction_of_ceiling']:.0%} of the compute-bound ceiling ({row['ceiling_tasks_per_s']} tasks/s)")


if __name__ == "__main__":
    main()
