"""Sweep `skinny_linear`'s launch parameters against cuBLAS (F.linear) on the decode-step
projections of issue 5's model at batch 1-4 (CUDA). One JSON line per (shape, config): mean
microseconds per call (CUDA events around a CUDA graph of `--iters` calls) and the weight bytes read per second.

    python3 bench/skinny_linear_bench.py --rows 1
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch
import torch.nn.functional as F

from kubellm.engine.kernels import triton_fused as tf

SHAPES = {
    "qkv": (4096, 1024),
    "o_proj": (1024, 2048),
    "gate_up": (6144, 1024),
    "down": (1024, 3072),
}


def _time_us(fn: object, iters: int) -> float:
    """GPU time per call inside a CUDA graph of `iters` calls (as in a decode step's graph:
    no Python launch overhead between the kernels)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()  # type: ignore[operator]
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()  # type: ignore[operator]
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / iters


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--block-n", default="4,8,16")
    parser.add_argument("--block-k", default="128,256,512")
    parser.add_argument("--warps", default="4,8")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"name": "skinny_linear", "skipped": True, "reason": "no CUDA"}))
        return 0
    ints = lambda t: [int(v) for v in t.split(",")]  # noqa: E731
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
        x = torch.randn(args.rows, k, dtype=torch.bfloat16, device="cuda")
        ref = F.linear(x, w)
        gb = n * k * 2 / 1e9
        us = _time_us(lambda: F.linear(x, w), args.iters)  # noqa: B023
        print(
            json.dumps(
                {
                    "name": "skinny_linear",
                    "shape": name,
                    "rows": args.rows,
                    "impl": "cublas",
                    "us": round(us, 2),
                    "tb_per_s": round(gb / us * 1e3, 3),
                }
            )
        )
        for bn, bk, warps in itertools.product(
            ints(args.block_n), ints(args.block_k), ints(args.warps)
        ):
            cfg = tf.SkinnyConfig(block_n=bn, block_k=bk, num_warps=warps)
            fn = lambda: tf.skinny_linear(x, w, config=cfg)  # noqa: E731,B023
            err = (fn().float() - ref.float()).abs().max().item()
            us = _time_us(fn, args.iters)
            print(
                json.dumps(
                    {
                        "name": "skinny_linear",
                        "shape": name,
                        "rows": args.rows,
                        "block_n": bn,
                        "block_k": bk,
                        "num_warps": warps,
                        "us": round(us, 2),
                        "tb_per_s": round(gb / us * 1e3, 3),
                        "max_abs_err": round(err, 4),
                    }
                ),
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
