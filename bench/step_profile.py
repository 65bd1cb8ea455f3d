"""Where a decode step's GPU time goes (CUDA): kernels per step, grouped by name.

Builds issue 5's Qwen3-0.6B-shaped checkpoint (as bench/gpu_bench.py does), starts `--batch`
greedy requests, steps until all of them decode, then profiles `--steps` decode steps with
torch.profiler and prints one JSON line per kernel name (launches and GPU microseconds per
step, share of the step's kernel time), then a summary line: wall time per step, kernel time per
step (the union of kernel spans), and the idle share. Settings mirror gpu_bench.py's triton
variant; `--variant` takes its modifiers (e.g. `triton:sync`).

    python3 bench/step_profile.py --batch 1 --batch 256
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import gpu_bench as gb


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, action="append", default=None)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--variant", default="triton")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--workdir", default=None)
    return parser.parse_args()


def kernel_table(trace: Path, steps: int) -> tuple[list[dict[str, Any]], float]:
    """Per-kernel-name launches and GPU time per step, and the union of kernel spans (us)."""
    events = json.loads(trace.read_text()).get("traceEvents", [])
    per_name: dict[str, list[float]] = defaultdict(list)
    spans = []
    for ev in events:
        if ev.get("ph") != "X" or ev.get("cat") not in ("kernel", "gpu_memcpy", "gpu_memset"):
            continue
        per_name[ev["name"][:90]].append(float(ev["dur"]))
        spans.append((float(ev["ts"]), float(ev["ts"]) + float(ev["dur"])))
    busy = gb.merge_intervals_us(spans)
    total = sum(sum(v) for v in per_name.values()) or 1.0
    rows = [
        {
            "kernel": name,
            "launches_per_step": round(len(durs) / steps, 2),
            "us_per_step": round(sum(durs) / steps, 2),
            "share": round(sum(durs) / total, 4),
        }
        for name, durs in per_name.items()
    ]
    rows.sort(key=lambda r: -r["us_per_step"])
    return rows, busy / steps


def profile_batch(engine: Any, prompts: list[list[int]], steps: int, top: int) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    rids = gb._add_all(engine, prompts, 2 * steps + 16)
    gb._step_until_all_decoding(engine, time.perf_counter() + 120)
    for _ in range(5):
        engine.step()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    wall = gb._since(started) / steps
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    engine.abort_requests(rids)
    while engine.has_work():
        engine.step()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        rows, busy_us = kernel_table(trace, steps)
    batch = len(prompts)
    for row in rows[:top]:
        print(json.dumps({"name": "step_profile.kernel", "batch": batch, **row}))
    kernels = sum(r["launches_per_step"] for r in rows)
    print(
        json.dumps(
            {
                "name": "step_profile",
                "batch": batch,
                "wall_ms_per_step": round(wall * 1e3, 4),
                "gpu_busy_ms_per_step": round(busy_us / 1e3, 4),
                "idle_share": round(max(0.0, 1 - busy_us / 1e6 / wall), 4),
                "launches_per_step": round(kernels, 1),
            }
        ),
        flush=True,
    )


def main() -> int:
    args = parse_args()
    import torch

    if not torch.cuda.is_available():
        print(json.dumps({"name": "step_profile", "skipped": True, "reason": "no CUDA"}))
        return 0
    batches = args.batch or [1, 256]
    gb_args = gb.parse_args(["--variants", args.variant, "--skip-transformers"])
    plan = gb.Plan.for_args(gb_args)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        cfg = gb.model_config(gb_args, plan)
        model_dir = gb.write_checkpoint(Path(tmp) / "model", cfg, gb_args.seed, "cuda")
        engine = gb.build_engine(model_dir, gb.engine_settings(gb_args, plan, args.variant))
        work = gb.make_workload(
            plan.num_requests, plan.prompt_len, plan.output_len, cfg["vocab_size"], gb_args.seed
        )
        for batch in batches:
            profile_batch(engine, work.prompts[:batch], args.steps, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
