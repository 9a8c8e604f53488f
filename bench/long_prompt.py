"""Long prompts on the packed engine, on one card: prefill in pieces against one whole pass, and memory.

    python bench/long_prompt.py --processor DIR [--out DIR] [--tokens 131072]

A random-weight Qwen3-VL-8B as in gpu_throughput.py. Prompts are random token ids (the tokenizer plays
no part in what is measured). Prints: the flash kernel's start-up check; for a 64K-token prompt, the
relative difference of the first token's logits and the agreement of 8 greedy tokens between one
whole prefill pass and 16K-token pieces; for a ``--tokens`` prompt, time and peak memory against the
planner's prediction, and the prompt budget the engine sets for an 80 GB card.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from gpu_throughput import build_and_save

from hpc_rerun.inference.engine import Engine
from hpc_rerun.inference.engine.kernels import flash_agrees
from hpc_rerun.inference.engine.memory import ACTIVATION_BYTES_PER_TOKEN, kv_bytes_per_token
from hpc_rerun.inference.engine.sampling import Sampling
from hpc_rerun.inference.engine.sequences import Prompt


class Capturing(Sampling):
    """Greedy, keeping the logits the first token was picked from."""

    first_logits = None

    def pick(self, logits, produced, seen=None):
        if self.first_logits is None:
            self.first_logits = logits.float().cpu()
        return super().pick(logits, produced, seen)


def random_prompt(tokens: int, seed: int) -> Prompt:
    ids = torch.randint(0, 150_000, (tokens,), generator=torch.Generator().manual_seed(seed))
    return Prompt(ids, torch.arange(tokens).expand(3, tokens).contiguous(), None, None)


def generate(engine: Engine, prompt: Prompt, pass_tokens: int) -> tuple[list[int], torch.Tensor, float]:
    engine.packed.prefill_tokens = pass_tokens
    sampling = Capturing(max_new_tokens=8, min_new_tokens=8, do_sample=False, temperature=1.0, top_k=0, top_p=1.0,
                         eos_token_ids=[], pad_token_id=0)
    torch.cuda.synchronize()
    start = time.perf_counter()
    (tokens,) = engine.packed.generate([prompt], sampling)
    torch.cuda.synchronize()
    return tokens, sampling.first_logits, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processor", type=Path, required=True)
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/qwen3vl-8b-random"))
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    parser.add_argument("--tokens", type=int, default=131_072)
    args = parser.parse_args()
    report = {"card": torch.cuda.get_device_name(0), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    report["build"] = build_and_save(args.processor, args.model_dir)
    engine = Engine(str(args.model_dir), dtype="bfloat16")
    report["flash_varlen"] = flash_agrees(engine.device, engine.model.dtype)
    generate(engine, random_prompt(2048, 0), 16384)  # warm-up

    prompt = random_prompt(65_536, 1)
    whole, whole_logits, whole_s = generate(engine, prompt, 65_536)
    pieces, piece_logits, pieces_s = generate(engine, prompt, 16_384)
    report["64k_whole_vs_pieces"] = {
        "logits_relative_difference": round(((whole_logits - piece_logits).norm() / whole_logits.norm()).item(), 5),
        "same_tokens": whole == pieces, "common_prefix": len(os.path.commonprefix([whole, pieces])),
        "whole_s": round(whole_s, 1), "pieces_s": round(pieces_s, 1)}
    print(json.dumps(report, indent=2), flush=True)

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    _, _, seconds = generate(engine, random_prompt(args.tokens, 2), 16_384)
    kv = kv_bytes_per_token(engine.model.config.text_config, engine.model.dtype)
    predicted = (torch.cuda.memory_allocated() + kv * (args.tokens + 8) + ACTIVATION_BYTES_PER_TOKEN * 16_384) / 1024**3
    report["long"] = {"tokens": args.tokens, "seconds": round(seconds, 1),
                      "peak_gib": round(torch.cuda.max_memory_allocated() / 1024**3, 1),
                      "predicted_gib": round(predicted, 1),
                      "prompt_budget_80gb_card": engine.token_budget({"do_sample": False, "max_new_tokens": 4096},
                                                                     79.6)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "long_prompt.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
