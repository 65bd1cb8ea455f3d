"""Sweep the paged decode attention kernel's launch parameters on the issue 5 shapes (CUDA).

One layer of the Qwen3-0.6B-shaped model (16 query heads, 8 KV heads, head_dim 128, bf16,
16-token blocks, a block table 96 blocks wide as at max_model_len 1536), 256 sequences whose
contexts are the workload's prompt lengths plus `--decoded` generated tokens. For each config
it prints one JSON line: milliseconds per call (CUDA events, mean of `--iters` after warm-up)
and the K/V bytes read per second. Multiply by 28 layers for a decode step's attention time.

    python3 bench/decode_kernel_bench.py --decoded 256
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import random
import sys

import torch

from kubellm.engine.kernels import triton_paged as tp


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--decoded", type=int, default=256)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--tiles", default="32,64,128")
    parser.add_argument("--warps", default="4,8")
    parser.add_argument("--stages", default="1,2,3,4")
    parser.add_argument("--partitions", default="256,512,2048")
    return parser.parse_args()


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> int:
    args = parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"name": "decode_kernel", "skipped": True, "reason": "no CUDA"}))
        return 0
    dev = torch.device("cuda")
    hq, hk, d, bs, max_blocks = 16, 8, 128, 16, 96
    rng = random.Random(0)
    lens = [min(rng.randint(100, 1024) + args.decoded, max_blocks * bs) for _ in range(args.batch)]
    blocks_needed = sum(-(-n // bs) for n in lens)
    num_blocks = blocks_needed + 64
    ids = list(range(num_blocks))
    rng.shuffle(ids)
    table = torch.zeros(args.batch, max_blocks, dtype=torch.int32)
    pos = 0
    for i, n in enumerate(lens):
        nb = -(-n // bs)
        table[i, :nb] = torch.tensor(ids[pos : pos + nb], dtype=torch.int32)
        pos += nb
    table = table.to(dev)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=dev)
    k_cache = torch.randn(num_blocks, bs, hk, d, dtype=torch.bfloat16, device=dev)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(args.batch, hq, d, dtype=torch.bfloat16, device=dev)
    kv_bytes = sum(lens) * hk * d * 2 * 2
    base = {"batch": args.batch, "mean_context": round(sum(lens) / len(lens), 1)}
    ref = tp.paged_decode_attention(q, k_cache, v_cache, table, seq_lens, d**-0.5)
    configs = itertools.product(
        _ints(args.partitions), _ints(args.tiles), _ints(args.warps), _ints(args.stages)
    )
    for part, tile, warps, stages in configs:
        cfg = tp.DecodeConfig(tile=tile, num_warps=warps, num_stages=stages)
        row = {
            "name": "decode_kernel",
            "partition": part,
            "tile": tile,
            "num_warps": warps,
            "num_stages": stages,
        }
        try:
            call = functools.partial(
                tp.paged_decode_attention,
                q,
                k_cache,
                v_cache,
                table,
                seq_lens,
                d**-0.5,
                partition_size=part,
                config=cfg,
            )
            out = call()
            err = (out.float() - ref.float()).abs().max().item()
            for _ in range(3):
                call()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(args.iters):
                call()
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end) / args.iters
        except Exception as exc:  # a config the compiler refuses: report it, go on
            print(json.dumps({**row, "error": str(exc)[:200]}), flush=True)
            continue
        timing = {
            "ms": round(ms, 4),
            "kv_tb_per_s": round(kv_bytes / ms / 1e9, 3),
            "max_abs_err_vs_default": round(err, 5),
        }
        print(json.dumps({**row, **base, **timing}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
