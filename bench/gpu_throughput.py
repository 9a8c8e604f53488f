"""GPU throughput of the worker's engine against the seed's way, side by side, on one card.

    python bench/gpu_throughput.py --processor DIR [--out DIR] [--seed-sample 4] [--skip-load]

A random-weight Qwen3-VL-8B with the real dimensions (../shared/notes/qwen3vl-offline.md), bf16 on the
GPU, saved to local disk and loaded back through the engine (from_pretrained, timed against reading
the same bytes). The tokenizer/processor is the tiny model's (``hpc-rerun build-tiny-model DIR``):
prompt lengths are set in its tokens, so the workload's shapes are the same on any machine.

Workload: 64 tasks, 16 of each RealHiTBench shape: text ~3K tokens, text ~16K, image 1600x1200 +
question, image + ~3K text; exactly 128 new tokens each (min_new_tokens, greedy), so random weights
cannot stop early. The seed's way (one task at a time, batch 1, HF generate) runs on every
``--seed-sample``-th task (the same mix; the whole 64 would take ~8 minutes at b1); the engine runs all
64 (length-bucketed batches under a memory budget, the next batch encoded while the GPU works).
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
from hpc_rerun.engine import Engine, Request, default_batch_tokens, fit_image, plan_batches
from hpc_rerun.prompts import DEFAULT_PROMPTS, build_prompt_text

NEW_TOKENS = 128


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
    for n in range(16):
        requests.append(("text-3k", Request(build_prompt_text(task, "text", "csv", table_of(tok, 3000, rng),
                                                              DEFAULT_PROMPTS), None, greedy)))
        requests.append(("text-16k", Request(build_prompt_text(task, "text", "csv", table_of(tok, 16000, rng),
                                                               DEFAULT_PROMPTS), None, greedy)))
        noise = Image.frombytes("RGB", (1600, 1200), rng.randbytes(1600 * 1200 * 3))
        image = fit_image(noise, None, None)
        requests.append(("image", Request(build_prompt_text(task, "image", None, None, DEFAULT_PROMPTS), image,
                                          greedy)))
        requests.append(("image+text-3k", Request(build_prompt_text(task, "mix", "csv", table_of(tok, 3000, rng),
                                                                    DEFAULT_PROMPTS), image, greedy)))
    for _, request in requests:
        request.prompt_tokens = engine.count_tokens(request)
    return requests


def run_seed_way(engine: Engine, requests: list[Request]) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for request in requests:
        engine.generate([request])
    torch.cuda.synchronize()
    return time.perf_counter() - start


def run_engine(engine: Engine, requests: list[Request], batch_tokens: int, new_tokens: int = NEW_TOKENS
               ) -> tuple[float, int]:
    """The worker's way over all requests; ``new_tokens=1`` times the prefill alone."""
    batches = plan_batches(requests, lambda r: r.prompt_tokens, batch_tokens)
    torch.cuda.synchronize()
    start = time.perf_counter()
    produced = 0
    for batch, (inputs, generation) in engine.pipelined(batches, lambda r: r):
        generation = dict(generation, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        produced += len(engine.generate_encoded((inputs, generation)))
    torch.cuda.synchronize()
    assert produced == len(requests)
    return time.perf_counter() - start, len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processor", type=Path, required=True, help="a tiny model folder (its processor is used)")
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/qwen3vl-8b-random"))
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    parser.add_argument("--seed-sample", type=int, default=4, help="the seed's way runs every N-th task")
    parser.add_argument("--batch-tokens", default="80gb",
                        help="comma-separated padded-token budgets per batch to compare; 'default': the engine's "
                             "for this card; '80gb': the engine's for an 80 GB card (the target's memory limit)")
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
    engine.generate([requests[0][1]])  # warm-up: kernels, allocator, cuBLAS handles
    engine.generate([r for _, r in requests[:4]])
    torch.cuda.reset_peak_memory_stats()
    sample = [r for _, r in requests[::args.seed_sample]]
    seed_s = run_seed_way(engine, sample)
    seed_peak = torch.cuda.max_memory_allocated() / 1024**3
    seed_rate = len(sample) / seed_s
    report["seed_way"] = {"tasks": len(sample), "seconds": round(seed_s, 1), "tasks_per_s": round(seed_rate, 3),
                          "peak_gib": round(seed_peak, 1)}
    report["engine"] = []
    named = {"default": default_batch_tokens(engine.device), "80gb": default_batch_tokens(engine.device, 79.6)}
    budgets = [named[b] if b in named else int(b) for b in args.batch_tokens.split(",")]
    for budget in budgets:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        engine_s, n_batches = run_engine(engine, [r for _, r in requests], budget)
        engine_peak = torch.cuda.max_memory_allocated() / 1024**3
        engine_rate = len(requests) / engine_s
        prefill_s, _ = run_engine(engine, [r for _, r in requests], budget, new_tokens=1)
        report["engine"].append({"batch_tokens": budget, "tasks": len(requests), "batches": n_batches,
                                 "seconds": round(engine_s, 1), "prefill_only_s": round(prefill_s, 1),
                                 "tasks_per_s": round(engine_rate, 3),
                                 "peak_gib": round(engine_peak, 1), "speedup": round(engine_rate / seed_rate, 2)})
        print(json.dumps(report["engine"][-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_throughput.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(f"\n{report['card']}: seed's way {seed_rate:.3f} tasks/s; load {report['load']['load_over_read']}x read")
    for row in report["engine"]:
        print(f"  engine, batch budget {row['batch_tokens']:>7} tokens: {row['tasks_per_s']:.3f} tasks/s, "
              f"{row['speedup']}x, peak {row['peak_gib']} GiB")


if __name__ == "__main__":
    main()
