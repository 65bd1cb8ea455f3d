"""GPU benchmark for issue 5: builds, checks and times everything in one call.

Writes a Qwen3-0.6B-shaped checkpoint with seeded random bf16 weights, then for each
`--variants` entry runs kubellm's engine (correctness gate against transformers, offline
throughput, batch-1 inter-token latency, time to first token, decode-step GPU busy share), and
finally the transformers baseline (batch-1 latency, `generate` in static batches) and the speedup
lines. stdout carries one JSON line per measurement and nothing else; progress goes to stderr.
See bench/README.md for the workload's exact definition and the command to run on the device.

    python3 bench/gpu_bench.py                          # the issue's workload, on CUDA
    python3 bench/gpu_bench.py --quick                  # 16 requests x 32 tokens, 2 layers
    .venv/bin/python bench/gpu_bench.py --device cpu --tiny --skip-transformers
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import itertools
import json
import logging
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

logger = logging.getLogger("bench.gpu_bench")

# The model: Qwen3-0.6B's shape (Hugging Face config.json keys).
QWEN3_0_6B: dict[str, Any] = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "vocab_size": 151936,
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    "tie_word_embeddings": True,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "use_sliding_window": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "pad_token_id": 151643,
    "dtype": "bfloat16",
}
# --tiny: a few-second CPU run that keeps every switch of the real shape (GQA, qk-norm, tied).
TINY_OVERRIDES: dict[str, Any] = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 512,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
WEIGHT_STD = 0.02
"""Standard deviation of every random matrix (norm weights are ones): activations stay finite."""


@dataclass(frozen=True)
class Plan:
    """Sizes of every case; `for_args` picks the issue's workload, --quick or --tiny."""

    num_layers: int | None  # None: the model's own
    num_requests: int
    prompt_len: tuple[int, int]
    output_len: int
    latency_prompt: int = 128
    latency_tokens: int = 256
    ttft_prompt: int = 1024
    ttft_reps: int = 5
    gate_prompts: int = 4
    gate_tokens: int = 32
    hf_batch: int = 64
    profile_steps: int = 20
    max_num_batched_tokens: int = 16384
    kv_cache_memory_gib: float = 4.0  # CPU only; CUDA sizes the cache from free memory
    hf_reserve_s: float = 150.0
    """Budget kept for the transformers cases while the engine variants run."""
    small_cases_s: float = 40.0
    """Budget of each variant kept for its latency, TTFT and profile cases."""
    min_variant_s: float = 60.0
    """A variant whose share is smaller than this is skipped (building it alone takes time)."""

    @classmethod
    def for_args(cls, args: argparse.Namespace) -> Plan:
        if args.tiny:
            return cls(
                num_layers=2,
                num_requests=8,
                prompt_len=(8, 48),
                output_len=8,
                latency_prompt=16,
                latency_tokens=8,
                ttft_prompt=48,
                ttft_reps=2,
                gate_prompts=2,
                gate_tokens=8,
                hf_batch=4,
                profile_steps=4,
                max_num_batched_tokens=256,
                kv_cache_memory_gib=0.05,
                hf_reserve_s=0.0,
                small_cases_s=0.0,
                min_variant_s=1.0,
            )
        if args.quick:
            return cls(
                num_layers=2,
                num_requests=16,
                prompt_len=(100, 1024),
                output_len=32,
                latency_tokens=32,
                ttft_reps=2,
                hf_batch=16,
                hf_reserve_s=20.0,
                small_cases_s=15.0,
                min_variant_s=20.0,
            )
        return cls(num_layers=None, num_requests=256, prompt_len=(100, 1024), output_len=512)


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    output_len: int

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def output_tokens(self) -> int:
        return len(self.prompts) * self.output_len


class Budget:
    """The hard stop: measurements that would run past `--time-budget-s` are skipped or cut."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.perf_counter() + seconds

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def share(self, parts: int, reserve: float) -> float:
        """A deadline for one of `parts` equal shares of what is left after `reserve`."""
        return time.perf_counter() + max(0.0, self.left() - reserve) / max(1, parts)


class Emitter:
    """Writes one JSON line per record to the real stdout, with the fields every line carries."""

    def __init__(self, out: TextIO, common: dict[str, Any]) -> None:
        self.out = out
        self.common = common
        self.failed = False

    def emit(self, name: str, **fields: Any) -> None:
        record = {"name": name, **self.common, **fields}
        self.out.write(json.dumps(record) + "\n")
        self.out.flush()

    def skip(self, name: str, reason: str) -> None:
        logger.warning("skipping %s: %s", name, reason)
        self.emit(name, skipped=True, reason=reason)

    def error(self, name: str, message: str) -> None:
        logger.error("%s failed: %s", name, message)
        self.failed = True
        self.emit(name, error=message)


# ---- arguments ------------------------------------------------------------------------------


VARIANT_MODES: dict[str, tuple[str, Any]] = {
    "eager": ("enforce_eager", True),
    "sync": ("async_scheduling", False),
    "unfused": ("fused_kernels", False),
}
"""Variant modifiers after the backend ("triton:eager:sync") and the setting each changes."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny model and workload (CPU test)")
    parser.add_argument("--quick", action="store_true", help="16 requests x 32 tokens, 2 layers")
    parser.add_argument(
        "--variants",
        default=None,
        help="engine variants in order: attention backend (auto, torch, triton), optionally "
        "with modifiers ':eager' (no CUDA graphs), ':sync' (no async scheduling) and "
        "':unfused' (no fused Triton norm/RoPE/SiLU kernels), e.g. "
        "'triton,triton:sync,triton:unfused:sync,torch'; default: "
        "'triton,torch' on CUDA (the faster first: what it leaves of its share goes to the "
        "next), 'torch' on CPU",
    )
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--time-budget-s", type=float, default=480.0)
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument(
        "--gate-tol",
        type=float,
        default=0.1,
        help="a token counts as agreeing when its transformers logit is within this fraction "
        "of the logits' standard deviation of the top logit",
    )
    parser.add_argument("--workdir", default=None, help="where to write the checkpoint")
    args = parser.parse_args(argv)
    if args.variants is None:
        args.variants = "triton,torch" if args.device == "cuda" else "torch"
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not args.variants:
        parser.error("--variants: name at least one variant")
    for variant in args.variants:
        backend, *modes = variant.split(":")
        if backend not in ("auto", "torch", "triton") or not set(modes) <= set(VARIANT_MODES):
            parser.error(f"--variants: unknown variant {variant!r}")
    if args.time_budget_s <= 0 or args.max_num_seqs < 1:
        parser.error("--time-budget-s and --max-num-seqs must be positive")
    return args


# ---- environment ----------------------------------------------------------------------------


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: str) -> dict[str, Any]:
    """Device name and versions: the fields every JSON line carries."""
    import torch

    import kubellm.engine

    triton_version = None
    with contextlib.suppress(ImportError):
        import triton

        triton_version = str(triton.__version__)
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = f"cpu ({platform.processor() or platform.machine()})"
    return {
        "device": name,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": triton_version,
            "transformers": _version("transformers"),
            "kubellm": _version("kubellm-engine"),
            "kubellm_src": str(Path(kubellm.engine.__file__).parent),
        },
    }


# ---- checkpoint and workload ----------------------------------------------------------------


def model_config(args: argparse.Namespace, plan: Plan) -> dict[str, Any]:
    cfg = dict(QWEN3_0_6B)
    if args.tiny:
        cfg.update(TINY_OVERRIDES)
    if plan.num_layers is not None:
        cfg["num_hidden_layers"] = plan.num_layers
    return cfg


def _tensor_shapes(cfg: dict[str, Any]) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Hugging Face Qwen3 tensor names and shapes (tied: no lm_head.weight)."""
    hidden, inter, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    yield "model.embed_tokens.weight", (cfg["vocab_size"], hidden)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (hidden,)
        yield p + "post_attention_layernorm.weight", (hidden,)
        yield p + "self_attn.q_proj.weight", (q, hidden)
        yield p + "self_attn.k_proj.weight", (kv, hidden)
        yield p + "self_attn.v_proj.weight", (kv, hidden)
        yield p + "self_attn.o_proj.weight", (hidden, q)
        yield p + "self_attn.q_norm.weight", (hd,)
        yield p + "self_attn.k_norm.weight", (hd,)
        yield p + "mlp.gate_proj.weight", (inter, hidden)
        yield p + "mlp.up_proj.weight", (inter, hidden)
        yield p + "mlp.down_proj.weight", (hidden, inter)
    yield "model.norm.weight", (hidden,)


def write_checkpoint(out_dir: Path, cfg: dict[str, Any], seed: int, device: str) -> Path:
    """config.json + model.safetensors (bf16), readable by our loader and by transformers.

    Matrices are N(0, WEIGHT_STD^2) drawn in name order from one generator seeded with `seed`
    on `device` (so the values depend on the device kind, not on the run); norms are ones.
    """
    import torch
    from safetensors.torch import save_file

    started = time.perf_counter()
    gen = torch.Generator(device=device).manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in _tensor_shapes(cfg):
        if len(shape) == 1:
            tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            continue
        w = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
        tensors[name] = w.mul_(WEIGHT_STD).to(torch.bfloat16).cpu()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    params = sum(t.numel() for t in tensors.values())
    logger.info("checkpoint: %.3g parameters in %.1f s at %s", params, _since(started), out_dir)
    return out_dir


def make_workload(
    n: int, prompt_len: tuple[int, int], output_len: int, vocab: int, seed: int
) -> Workload:
    """Lengths: `random.Random(seed).randint(lo, hi)` for each request, all drawn first; then
    token ids: `random.Random(seed + 1).randrange(vocab)` for every position, request by request."""
    lengths_rng = random.Random(seed)
    lengths = [lengths_rng.randint(*prompt_len) for _ in range(n)]
    return Workload(random_prompts(lengths, vocab, seed + 1), output_len)


def random_prompts(lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(length)] for length in lengths]


# ---- kubellm engine -------------------------------------------------------------------------


@dataclass
class RunStats:
    """What one batch of requests through the engine produced, with timestamps."""

    tokens: list[list[int]]
    arrivals: list[list[float]]
    """Per request: perf_counter() when each token came out of a step."""
    started: float
    seconds: float
    num_steps: int
    aborted: bool
    step_s: list[float] = field(default_factory=list)

    @property
    def output_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)


_request_ids = itertools.count()


def engine_settings(args: argparse.Namespace, plan: Plan, variant: str) -> dict[str, Any]:
    """EngineSettings for a variant; `attention_backend` only when the field exists."""
    from kubellm.protocol.settings import EngineSettings

    backend, *modes = variant.split(":")
    max_len = plan.prompt_len[1] + max(plan.output_len, plan.latency_tokens)
    max_len = max(max_len, plan.ttft_prompt + 1, plan.latency_prompt + plan.latency_tokens)
    max_len = max(max_len, plan.prompt_len[1] + 2 * plan.profile_steps + 8)  # decode_profile
    settings: dict[str, Any] = {
        "device": args.device,
        "dtype": args.dtype,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens or plan.max_num_batched_tokens,
        "max_model_len": max_len,
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "kv_cache_memory_gib": plan.kv_cache_memory_gib,
        "enforce_eager": "eager" in modes,
        "seed": args.seed,
    }
    for mode, (field_name, value) in VARIANT_MODES.items():
        if mode in modes:
            if field_name not in EngineSettings.model_fields:
                raise LookupError(f"EngineSettings has no {field_name} field")
            settings[field_name] = value
    if "attention_backend" in EngineSettings.model_fields:
        settings["attention_backend"] = backend
    elif backend != "torch":
        raise LookupError("EngineSettings has no attention_backend field yet")
    return settings


def build_engine(model_dir: Path, settings: dict[str, Any]) -> Any:
    from kubellm.engine.llm_engine import LLMEngine
    from kubellm.protocol.settings import EngineSettings

    return LLMEngine.from_settings(EngineSettings(model=str(model_dir), **settings))


def drive(engine: Any, prompts: list[list[int]], max_tokens: int, deadline: float) -> RunStats:
    """Add every prompt (greedy, EOS ignored, so exactly `max_tokens` each), step until all
    finish. (No min_tokens: with ignore_eos it would only add per-step sampler work.)

    Stops early at `deadline` (perf_counter), aborting what is left: then `aborted` is True.
    """
    stats = RunStats([[] for _ in prompts], [[] for _ in prompts], time.perf_counter(), 0, 0, False)
    rids = _add_all(engine, prompts, max_tokens)
    index = {rid: i for i, rid in enumerate(rids)}
    unfinished = set(rids)
    while unfinished:
        if time.perf_counter() > deadline:
            engine.abort_requests(sorted(unfinished))
            stats.aborted = True
            break
        step_start = time.perf_counter()
        outputs = engine.step()
        now = time.perf_counter()
        stats.step_s.append(now - step_start)
        for out in outputs:
            i = index.get(out.request_id)
            if i is None:
                continue
            stats.tokens[i].extend(out.new_token_ids)
            stats.arrivals[i].extend([now] * len(out.new_token_ids))
            if out.finish_reason is not None:
                unfinished.discard(out.request_id)
                if out.error:
                    raise RuntimeError(f"request {out.request_id} failed: {out.error}")
    stats.seconds = time.perf_counter() - stats.started
    stats.num_steps = len(stats.step_s)
    return stats


def warm_up(engine: Any, plan: Plan, vocab: int, seed: int) -> None:
    """Compile kernels and capture graphs outside the timed runs: a full batch of short
    prompts, then a few long ones; the prefix cache is emptied afterwards."""
    started = time.perf_counter()
    batch = min(engine.max_num_seqs, max(plan.num_requests, 1))
    drive(engine, random_prompts([16] * batch, vocab, seed + 100), 4, float("inf"))
    long = [plan.prompt_len[1], plan.prompt_len[0], plan.ttft_prompt]
    drive(engine, random_prompts(long, vocab, seed + 101), 2, float("inf"))
    engine.reset_prefix_cache()
    logger.info("warm-up done in %.1f s", _since(started))


def throughput_fields(stats: RunStats, work: Workload) -> dict[str, Any]:
    expected = [work.output_len] * len(work.prompts)
    exact = [len(t) for t in stats.tokens] == expected
    return {
        "num_requests": len(work.prompts),
        "prompt_tokens": work.prompt_tokens,
        "output_tokens": stats.output_tokens,
        "seconds": round(stats.seconds, 4),
        "tokens_per_s": round(stats.output_tokens / stats.seconds, 2),
        "total_tokens_per_s": round((stats.output_tokens + work.prompt_tokens) / stats.seconds, 2),
        "num_steps": stats.num_steps,
        "aborted": stats.aborted,
        "all_lengths_exact": exact,
    }


def latency_fields(arrivals: list[float], started: float) -> dict[str, Any]:
    """Inter-token latency (between consecutive tokens, the first one excluded) and TTFT."""
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    out: dict[str, Any] = {"ttft_ms": round((arrivals[0] - started) * 1e3, 3)}
    if gaps:
        out.update(
            itl_mean_ms=round(statistics.fmean(gaps) * 1e3, 4),
            itl_p50_ms=round(_quantile(gaps, 0.5) * 1e3, 4),
            itl_p99_ms=round(_quantile(gaps, 0.99) * 1e3, 4),
        )
    return out


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _since(started: float) -> float:
    return time.perf_counter() - started


def merge_intervals_us(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by the union of [start, end) intervals."""
    total, cur_start, cur_end = 0.0, None, None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None and cur_start is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None and cur_start is not None:
        total += cur_end - cur_start
    return total


def gpu_busy_us(trace_file: Path) -> float:
    """Union of GPU activity (kernels, memcpy, memset) in a torch.profiler Chrome trace."""
    trace = json.loads(trace_file.read_text(encoding="utf-8"))
    spans = [
        (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)))
        for e in trace.get("traceEvents", [])
        if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
    ]
    return merge_intervals_us(spans)


# ---- engine cases ----------------------------------------------------------------------------


@dataclass
class VariantResult:
    throughput: float | None = None
    itl_ms: float | None = None
    gate_tokens: list[list[int]] = field(default_factory=list)


class EngineCases:
    """Runs one variant's cases on a built engine, each guarded by the budget."""

    def __init__(
        self, engine: Any, args: argparse.Namespace, plan: Plan, work: Workload, em: Emitter
    ) -> None:
        self.engine, self.args, self.plan, self.work, self.em = engine, args, plan, work, em
        self.vocab = engine.vocab_size

    def gate(self) -> list[list[int]]:
        prompts = self.work.prompts[: self.plan.gate_prompts]
        stats = drive(self.engine, prompts, self.plan.gate_tokens, float("inf"))
        self.engine.reset_prefix_cache()
        return stats.tokens

    def throughput(self, name: str, deadline: float, fields: dict[str, Any]) -> float | None:
        preemptions = self.engine.scheduler.num_preemptions
        stats = drive(self.engine, self.work.prompts, self.work.output_len, deadline)
        self.engine.reset_prefix_cache()
        record = throughput_fields(stats, self.work)
        record["mean_step_ms"] = round(statistics.fmean(stats.step_s or [0.0]) * 1e3, 3)
        record["num_preemptions"] = self.engine.scheduler.num_preemptions - preemptions
        self.em.emit(name, **record, **fields)
        return None if stats.aborted else float(record["tokens_per_s"])

    def latency(self, name: str, deadline: float) -> float | None:
        plan = self.plan
        prompt = random_prompts([plan.latency_prompt], self.vocab, self.args.seed + 2)
        stats = drive(self.engine, prompt, plan.latency_tokens, deadline)
        self.engine.reset_prefix_cache()
        if not stats.arrivals[0]:
            self.em.skip(name, "time budget spent")
            return None
        fields = latency_fields(stats.arrivals[0], stats.started)
        self.em.emit(
            name,
            batch_size=1,
            prompt_tokens=plan.latency_prompt,
            output_tokens=stats.output_tokens,
            seconds=round(stats.seconds, 4),
            tokens_per_s=round(stats.output_tokens / stats.seconds, 2),
            aborted=stats.aborted,
            **fields,
        )
        return None if stats.aborted else fields.get("itl_mean_ms")

    def ttft(self, name: str, deadline: float) -> None:
        plan = self.plan
        prompts = random_prompts(
            [plan.ttft_prompt] * plan.ttft_reps, self.vocab, self.args.seed + 3
        )
        ttfts, total = [], 0.0
        for prompt in prompts:  # one request alone each time: low load
            stats = drive(self.engine, [prompt], 1, deadline)
            if stats.aborted:
                break
            ttfts.append(stats.arrivals[0][0] - stats.started)
            total += stats.seconds
        self.engine.reset_prefix_cache()
        if not ttfts:
            self.em.skip(name, "time budget spent")
            return
        self.em.emit(
            name,
            prompt_tokens=plan.ttft_prompt,
            reps=len(ttfts),
            output_tokens=len(ttfts),
            seconds=round(total, 4),
            tokens_per_s=round(len(ttfts) / total, 2),
            ttft_mean_ms=round(statistics.fmean(ttfts) * 1e3, 3),
            ttft_p50_ms=round(_quantile(ttfts, 0.5) * 1e3, 3),
            ttft_min_ms=round(min(ttfts) * 1e3, 3),
        )

    def decode_profile(self, name: str, deadline: float) -> None:
        """Decode steps at full batch: wall time per step, and the share the GPU was busy."""
        n = self.plan.profile_steps
        prompts = self.work.prompts[: self.engine.max_num_seqs]
        rids = _add_all(self.engine, prompts, 2 * n + 8)
        try:
            prefill_steps = _step_until_all_decoding(self.engine, deadline)
            wall = _timed_steps(self.engine, n)
            busy_share, profiled = _profiled_busy_share(self.engine, n, wall)
        except TimeoutError as exc:
            self.em.skip(name, str(exc))
            return
        finally:
            self.engine.abort_requests(rids)
            self.engine.reset_prefix_cache()
        self.em.emit(
            name,
            batch_size=len(prompts),
            steps=n,
            prefill_steps=prefill_steps,
            output_tokens=n * len(prompts),
            seconds=round(wall, 4),
            tokens_per_s=round(n * len(prompts) / wall, 2),
            step_ms=round(wall / n * 1e3, 3),
            profiled_step_ms=None if profiled is None else round(profiled / n * 1e3, 3),
            gpu_busy_share=busy_share,
            overhead_share=None if busy_share is None else round(1 - busy_share, 4),
            **({} if busy_share is not None else {"reason": "no CUDA device"}),
        )


def _add_all(engine: Any, prompts: list[list[int]], max_tokens: int) -> list[str]:
    """Add greedy requests of exactly `max_tokens` each (EOS ignored); their request ids."""
    from kubellm.protocol.messages import AddRequest, SamplingParams

    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    rids = [f"bench-{next(_request_ids)}" for _ in prompts]
    for rid, prompt in zip(rids, prompts, strict=True):
        engine.add_request(
            AddRequest(
                request_id=rid,
                prompt_token_ids=tuple(prompt),
                sampling=sampling,
                arrival_time=time.time(),
            )
        )
    return rids


def _step_until_all_decoding(engine: Any, deadline: float) -> int:
    sched, steps = engine.scheduler, 0
    while sched.waiting or any(s.num_computed_tokens < s.num_prompt_tokens for s in sched.running):
        if time.perf_counter() > deadline:
            raise TimeoutError("time budget spent before the batch reached decode")
        engine.step()
        steps += 1
    return steps


def _timed_steps(engine: Any, n: int) -> float:
    started = time.perf_counter()
    for _ in range(n):
        engine.step()
    return _since(started)


def _profiled_busy_share(engine: Any, n: int, wall: float) -> tuple[float | None, float | None]:
    """GPU busy time per step (union of kernel/memcpy spans, under torch.profiler) over the
    unprofiled wall time per step; (None, None) without CUDA."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    if engine.device.split(":")[0] != "cuda":
        return None, None
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        started = time.perf_counter()
        for _ in range(n):
            engine.step()
        profiled = _since(started)
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        busy_s = gpu_busy_us(trace) / 1e6
    return round(min(1.0, busy_s / wall), 4), profiled


# ---- transformers ---------------------------------------------------------------------------


def load_hf(model_dir: Path, device: str, dtype: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    return model.to(device).eval()


def hf_agreement(model: Any, prompt: list[int], ours: list[int], tol: float) -> dict[str, Any]:
    """Teacher-forced: transformers' logits at each of our generated positions.

    `exact_prefix`: how many leading tokens are transformers' own greedy choice (its free-run
    greedy output agrees that far). `within_tol`: positions whose token's logit is within
    tol * std(logits) of the top logit (bf16 near-ties), counted over all positions.
    """
    import torch

    ids = torch.tensor([prompt + ours[:-1]], device=model.device)
    with torch.inference_mode():
        logits = model(input_ids=ids, logits_to_keep=len(ours)).logits[0].float()
    picked = torch.tensor(ours, device=logits.device)
    top = logits.max(dim=-1).values
    deficit = top - logits.gather(1, picked[:, None])[:, 0]
    close = deficit <= tol * logits.std(dim=-1)
    exact = (deficit <= 0).tolist()
    prefix = next((i for i, ok in enumerate(exact) if not ok), len(exact))
    return {
        "exact_prefix": prefix,
        "within_tol": int(close.sum()),
        "first_ok": bool(close[0]),
        "max_deficit": round(float(deficit.max()), 4),
    }


def gate_record(
    model: Any, prompts: list[list[int]], ours: list[list[int]], tol: float
) -> dict[str, Any]:
    rows = [hf_agreement(model, p, o, tol) for p, o in zip(prompts, ours, strict=True)]
    return {
        "prompts": len(rows),
        "tokens_each": len(ours[0]) if ours else 0,
        "exact_prefix": [r["exact_prefix"] for r in rows],
        "min_exact_prefix": min(r["exact_prefix"] for r in rows),
        "within_tol": [r["within_tol"] for r in rows],
        "max_deficit": [r["max_deficit"] for r in rows],
        "tol_std_fraction": tol,
        "first_token_ok": all(r["first_ok"] for r in rows),
    }


class _Clock:
    """A transformers streamer that only timestamps: put() runs once per generated step
    (after the prompt), and the tokens it gets are already on the host (a sync point)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def hf_generate(model: Any, prompts: list[list[int]], new_tokens: int, streamer: Any = None) -> Any:
    """Left-padded static batch, greedy, exactly `new_tokens` (min_new_tokens masks EOS)."""
    import torch
    from transformers import GenerationConfig

    pad = getattr(model.config, "pad_token_id", None)
    pad = 0 if pad is None else pad
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    config = GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=pad,
        eos_token_id=getattr(model.config, "eos_token_id", None),
    )
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids.to(model.device),
            attention_mask=mask.to(model.device),
            generation_config=config,
            streamer=streamer,
        )
    return out[:, width:]


def hf_latency(model: Any, plan: Plan, vocab: int, seed: int, em: Emitter) -> float | None:
    prompt = random_prompts([plan.latency_prompt], vocab, seed + 2)
    clock = _Clock()
    started = time.perf_counter()
    out = hf_generate(model, prompt, plan.latency_tokens, streamer=clock)
    seconds = _since(started)
    arrivals = clock.times[1:]  # the first put() is the prompt
    fields = latency_fields(arrivals, started)
    em.emit(
        "transformers.latency",
        batch_size=1,
        prompt_tokens=plan.latency_prompt,
        output_tokens=int(out.shape[1]),
        seconds=round(seconds, 4),
        tokens_per_s=round(int(out.shape[1]) / seconds, 2),
        **fields,
    )
    return fields.get("itl_mean_ms")


def hf_throughput(
    model: Any, plan: Plan, work: Workload, budget: Budget, em: Emitter
) -> float | None:
    """Static batches of plan.hf_batch in arrival order; stops before a batch that would not
    fit in the budget (then the line is partial, with aborted=true)."""
    done, tokens, seconds, last = 0, 0, 0.0, 0.0
    for first in range(0, len(work.prompts), plan.hf_batch):
        if budget.left() < 1.2 * last:
            break
        batch = work.prompts[first : first + plan.hf_batch]
        started = time.perf_counter()
        out = hf_generate(model, batch, work.output_len)
        last = _since(started)
        seconds += last
        tokens += int(out.numel())
        done += len(batch)
        logger.info("transformers: %d/%d requests, %.1f s", done, len(work.prompts), seconds)
    if done == 0:
        em.skip("transformers.throughput", "time budget spent")
        return None
    em.emit(
        "transformers.throughput",
        num_requests=done,
        batch_size=plan.hf_batch,
        output_tokens=tokens,
        seconds=round(seconds, 4),
        tokens_per_s=round(tokens / seconds, 2),
        aborted=done < len(work.prompts),
    )
    return None if done < len(work.prompts) else tokens / seconds


# ---- orchestration --------------------------------------------------------------------------


@dataclass
class Context:
    args: argparse.Namespace
    plan: Plan
    work: Workload
    model_dir: Path
    em: Emitter
    budget: Budget
    hf: Any = None


def free_memory() -> None:
    """Return freed CUDA memory to the driver, so the next engine sizes its KV cache from it."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_variant(variant: str, ctx: Context, deadline: float) -> VariantResult | None:
    """Build the engine, gate it against transformers, then time it. None when skipped."""
    em, plan, args = ctx.em, ctx.plan, ctx.args
    prefix = f"kubellm.{variant}"
    try:
        settings = engine_settings(args, plan, variant)
    except LookupError as exc:
        em.skip(prefix, str(exc))
        return None
    if deadline - time.perf_counter() < plan.min_variant_s:
        em.skip(prefix, "time budget spent")
        return None
    started = time.perf_counter()
    cases = EngineCases(build_engine(ctx.model_dir, settings), args, plan, ctx.work, em)
    warm_up(cases.engine, plan, cases.vocab, args.seed)
    fields = {
        "settings": settings,
        "attention_backend_resolved": getattr(cases.engine.executor, "attention_backend", None),
        "num_kv_blocks": cases.engine.num_kv_blocks,
        "block_size": cases.engine.block_size,
        "build_s": round(_since(started), 2),
    }
    result = VariantResult(gate_tokens=cases.gate())
    if ctx.hf is None:
        em.skip(prefix + ".correctness", "--skip-transformers: no reference")
    elif not check_gate(prefix, ctx, result.gate_tokens):
        em.skip(prefix + ".timing", "correctness gate failed: the first token differs")
        return result
    result.throughput = cases.throughput(
        prefix + ".throughput", deadline - plan.small_cases_s, fields
    )
    for case in ("latency", "ttft", "decode_profile"):
        if deadline - time.perf_counter() < 2:
            em.skip(f"{prefix}.{case}", "time budget spent")
            continue
        value = getattr(cases, case)(f"{prefix}.{case}", deadline)
        if case == "latency":
            result.itl_ms = value
    return result


def check_gate(prefix: str, ctx: Context, ours: list[list[int]]) -> bool:
    prompts = ctx.work.prompts[: len(ours)]
    record = gate_record(ctx.hf, prompts, ours, ctx.args.gate_tol)
    ctx.em.emit(prefix + ".correctness", **record)
    if not record["first_token_ok"]:
        ctx.em.failed = True
        logger.error(
            "CORRECTNESS GATE FAILED for %s: the first greedy token differs from transformers "
            "(beyond bf16 tolerance) for at least one prompt: %s",
            prefix,
            record,
        )
    return bool(record["first_token_ok"])


def run_variants(ctx: Context) -> dict[str, VariantResult]:
    """Each variant in turn, with an equal share of the budget left after the HF reserve."""
    results: dict[str, VariantResult] = {}
    reserve = 0.0 if ctx.hf is None else ctx.plan.hf_reserve_s
    for i, variant in enumerate(ctx.args.variants):
        deadline = ctx.budget.share(len(ctx.args.variants) - i, reserve)
        try:
            result = run_variant(variant, ctx, deadline)
        except Exception as exc:  # one broken variant must not cost the others' numbers
            logger.exception("variant %s failed", variant)
            ctx.em.error(f"kubellm.{variant}", f"{type(exc).__name__}: {exc}")
            result = None
        free_memory()  # after the frames holding the engine are gone
        if result is not None:
            results[variant] = result
    return results


def run_transformers(ctx: Context) -> tuple[float | None, float | None]:
    """transformers' batch-1 latency and static-batch throughput: (tokens/s, ITL ms)."""
    em, hf = ctx.em, ctx.hf
    itl = None
    if ctx.budget.left() > 5:
        itl = hf_latency(hf, ctx.plan, hf.config.vocab_size, ctx.args.seed, em)
    else:
        em.skip("transformers.latency", "time budget spent")
    return hf_throughput(hf, ctx.plan, ctx.work, ctx.budget, em), itl


def run_all(ctx: Context) -> None:
    if not ctx.args.skip_transformers:
        ctx.hf = load_hf(ctx.model_dir, ctx.args.device, ctx.args.dtype)
        hf_generate(ctx.hf, [[1, 2, 3, 4], [5, 6]], 4)  # warm-up
    results = run_variants(ctx)
    if ctx.hf is None:
        return
    hf_tps, hf_itl = run_transformers(ctx)
    emit_speedups(results, hf_tps, hf_itl, ctx.em)


def emit_speedups(
    results: dict[str, VariantResult], hf_tps: float | None, hf_itl: float | None, em: Emitter
) -> None:
    for variant, r in results.items():
        if r.throughput is not None and hf_tps:
            em.emit(
                f"speedup.{variant}.throughput",
                ratio=round(r.throughput / hf_tps, 3),
                kubellm_tokens_per_s=round(r.throughput, 2),
                transformers_tokens_per_s=round(hf_tps, 2),
            )
        if r.itl_ms and hf_itl:
            em.emit(
                f"speedup.{variant}.itl",
                ratio=round(hf_itl / r.itl_ms, 3),
                kubellm_itl_mean_ms=r.itl_ms,
                transformers_itl_mean_ms=hf_itl,
            )


def use_this_checkout() -> None:
    """Put this checkout's protocol/ and engine/ sources first on sys.path, so the benchmark
    measures this tree even where older kubellm wheels are installed (the device machine)."""
    root = Path(__file__).resolve().parents[1]
    for src in (root / "engine" / "src", root / "protocol" / "src"):
        if (src / "kubellm").is_dir() and str(src) not in sys.path:
            sys.path.insert(0, str(src))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    use_this_checkout()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    with json_only_stdout() as out:
        return _main(args, out)


@contextlib.contextmanager
def json_only_stdout() -> Iterator[TextIO]:
    """Yield a stream on the real stdout for the JSON lines, while anything else written to
    stdout, from Python or from native code (CUDA, Triton, the profiler), goes to stderr."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    real_stdout, sys.stdout = sys.stdout, sys.stderr
    out = os.fdopen(os.dup(saved), "w", encoding="utf-8")
    try:
        yield out
    finally:
        out.close()
        sys.stdout = real_stdout
        os.dup2(saved, 1)
        os.close(saved)


def _main(args: argparse.Namespace, out: TextIO) -> int:
    import torch

    budget = Budget(args.time_budget_s)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available (use --device cpu --tiny)")
    if args.device == "cpu":
        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    plan = Plan.for_args(args)
    em = Emitter(out, environment(args.device))
    cfg = model_config(args, plan)
    work = make_workload(
        plan.num_requests, plan.prompt_len, plan.output_len, cfg["vocab_size"], args.seed
    )
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="kubellm-bench-") as tmp:
        model_dir = write_checkpoint(Path(tmp) / "model", cfg, args.seed, args.device)
        em.emit(
            "workload",
            model={k: cfg[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers")},
            num_requests=len(work.prompts),
            prompt_tokens=work.prompt_tokens,
            prompt_len_range=list(plan.prompt_len),
            output_len=work.output_len,
            dtype=args.dtype,
            seed=args.seed,
            time_budget_s=args.time_budget_s,
        )
        run_all(Context(args, plan, work, model_dir, em, budget))
    return 1 if em.failed else 0


if __name__ == "__main__":
    sys.exit(main())
