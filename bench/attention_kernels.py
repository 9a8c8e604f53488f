"""Attention kernels for a long prompt prefilled in pieces (Qwen3-VL-8B's heads), side by side on one card.

    python bench/attention_kernels.py [--tokens 262144] [--pieces 16384,32768] [--out DIR]

One layer's attention for a whole prompt of ``--tokens`` tokens prefilled in pieces: each piece's queries
attend to every earlier key and causally to its own (32 query heads, 8 K/V heads, head_dim 128, bf16,
keys laid out as the engine's K/V pool holds them). Variants:
- ``fa2_varlen``: the engine's kernel, flash-attention 2 varlen with the causal mask aligned to the last key;
- ``cudnn_split``: cuDNN (SDPA's Hopper kernel) twice per piece, the earlier keys without a mask and the
  piece's own keys causally, merged by their log-sum-exp;
- ``fa2_split``: the same split with flash-attention 2, to tell the kernel from the split;
- ``sdpa_lower_right``: SDPA with a lower-right causal bias, whatever backend it picks.
Each is checked against ``fa2_varlen`` on the last piece (relative error), and the card's dense bf16
matrix rate is measured in the same run (the ceiling). TFLOP/s count causal attention: 4 x queries x
keys x heads x head_dim, halved on the diagonal blocks.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HEADS, KV_HEADS, DIM = 32, 8, 128
SCALE = DIM**-0.5


def fa2_varlen(q, k, v, keys):
    """The engine's call: one sequence whose region holds ``keys`` keys, the piece's queries the last."""
    n = q.shape[0]
    cu_q = torch.tensor([0, n], dtype=torch.int32, device=q.device)
    starts = torch.tensor([0, keys], dtype=torch.int32, device=q.device)
    used = torch.tensor([keys], dtype=torch.int32, device=q.device)
    return torch.ops.aten._flash_attention_forward(q, k, v, cu_q, starts, n, keys, 0.0, True, False, scale=SCALE,
                                                   seqused_k=used)[0]


def _merge(parts):
    """Attention outputs over disjoint key sets ([heads, n, dim], lse [heads, n]) merged exactly."""
    lse = torch.stack([p[1] for p in parts])
    weights = torch.softmax(lse, dim=0)
    return sum(w[..., None] * p[0].float() for w, p in zip(weights, parts))


def _grouped(k, keys_from, keys_to):
    """K/V heads as SDPA wants them: [1, heads, keys, dim] with each K/V head repeated for its 4 query heads."""
    return k[keys_from:keys_to].transpose(0, 1).repeat_interleave(HEADS // KV_HEADS, dim=0)[None]


def cudnn_split(q, k, v, keys):
    n = q.shape[0]
    query = q.transpose(0, 1)[None]
    parts = []
    if keys > n:
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
            query, _grouped(k, 0, keys - n), _grouped(v, 0, keys - n), None, True, 0.0, False, False, scale=SCALE)[:2]
        parts.append((out[0], lse[0].float().reshape(HEADS, n)))
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        query, _grouped(k, keys - n, keys), _grouped(v, keys - n, keys), None, True, 0.0, True, False, scale=SCALE)[:2]
    parts.append((out[0], lse[0].float().reshape(HEADS, n)))
    return _merge(parts).to(q.dtype).transpose(0, 1)


def fa2_split(q, k, v, keys):
    n = q.shape[0]
    parts = []
    for begin, end, causal in ((0, keys - n, False), (keys - n, keys, True)):
        if end <= begin:
            continue
        cu_q = torch.tensor([0, n], dtype=torch.int32, device=q.device)
        cu_k = torch.tensor([0, end - begin], dtype=torch.int32, device=q.device)
        out, lse = torch.ops.aten._flash_attention_forward(q, k[begin:end], v[begin:end], cu_q, cu_k, n, end - begin,
                                                           0.0, causal, False, scale=SCALE)[:2]
        parts.append((out.transpose(0, 1), lse.float().reshape(HEADS, -1)[:, :n]))
    return _merge(parts).to(q.dtype).transpose(0, 1)


def engine_split(q, k, v, keys):
    """The engine's split_prefill (stacked query heads for the earlier keys) on cuDNN."""
    import functools

    from hpc_rerun.inference.engine.attention import cudnn_attend, split_prefill

    return split_prefill(q, k, v, 0, keys, functools.partial(cudnn_attend, scale=SCALE))


def sdpa_lower_right(q, k, v, keys):
    from torch.nn.attention.bias import causal_lower_right

    n = q.shape[0]
    bias = causal_lower_right(n, keys)
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k[:keys].transpose(0, 1)[None],
                                         v[:keys].transpose(0, 1)[None], attn_mask=bias, scale=SCALE, enable_gqa=True)
    return out[0].transpose(0, 1)


VARIANTS = {"fa2_varlen": fa2_varlen, "cudnn_split": cudnn_split, "engine_split": engine_split,
            "fa2_split": fa2_split, "sdpa_lower_right": sdpa_lower_right}


def memory_probe(tokens: int, piece: int) -> list[dict]:
    """Peak memory above the inputs of each variant on the last piece (the largest attention call)."""
    k = torch.randn(tokens, KV_HEADS, DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(piece, HEADS, DIM, device="cuda", dtype=torch.bfloat16)
    rows = []
    for name in ("fa2_varlen", "cudnn_split", "engine_split"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        try:
            VARIANTS[name](q, k, v, tokens)
            torch.cuda.synchronize()
            rows.append({"variant": name, "piece": piece, "keys": tokens,
                         "peak_above_inputs_gib": round((torch.cuda.max_memory_allocated() - base) / 1024**3, 2)})
        except Exception as err:  # noqa: BLE001
            rows.append({"variant": name, "error": f"{type(err).__name__}: {str(err)[:200]}"})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def flops(piece: int, keys: int) -> float:
    earlier = keys - piece
    return 4 * HEADS * DIM * (piece * earlier + piece * piece / 2)


def timed(fn, repeat: int = 3) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return sorted(times)[len(times) // 2]


def matmul_rate() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    return 2 * 8192**3 / timed(lambda: a @ b, 10) / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=262144)
    parser.add_argument("--pieces", default="16384,32768")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    parser.add_argument("--memory", action="store_true", help="only the peak memory of each variant's largest call")
    args = parser.parse_args()
    if args.memory:
        for piece in [int(x) for x in args.pieces.split(",")]:
            memory_probe(args.tokens, piece)
        return
    torch.manual_seed(0)
    report = {"card": torch.cuda.get_device_name(0), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "cudnn": torch.backends.cudnn.version(), "tokens": args.tokens, "matmul_tflops": round(matmul_rate(), 1)}
    k = torch.randn(args.tokens, KV_HEADS, DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    rows = []
    for piece in [int(x) for x in args.pieces.split(",")]:
        q_all = torch.randn(args.tokens, HEADS, DIM, device="cuda", dtype=torch.bfloat16)
        reference = fa2_varlen(q_all[-piece:].contiguous(), k, v, args.tokens).float()
        for name, fn in VARIANTS.items():
            row = {"piece": piece, "variant": name}
            try:
                last = fn(q_all[-piece:].contiguous(), k, v, args.tokens).float()
                row["rel_error"] = float((last - reference).norm() / reference.norm())
                seconds, work = 0.0, 0.0
                for end in range(piece, args.tokens + 1, piece):
                    q = q_all[end - piece:end].contiguous()
                    seconds += timed(lambda: fn(q, k, v, end))
                    work += flops(piece, end)
                row.update(seconds_per_layer=round(seconds, 3), tflops=round(work / seconds / 1e12, 1),
                           prompt_prefill_attention_s=round(seconds * 36, 1))
            except Exception as err:  # noqa: BLE001 - a kernel this build lacks is a finding, not a crash
                row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()
    report["rows"] = rows
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "attention_kernels.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}))
    for row in rows:
        print(f"piece {row['piece']:>6} {row['variant']:<18} " + (
            row.get("error")
            or f"{row['tflops']:>6} TFLOP/s  {row['prompt_prefill_attention_s']:>6} s/prompt (36 layers)"
                                f"  err {row['rel_error']:.1e}"))


if __name__ == "__main__":
    main()
