"""Online benchmark for issue 5: `kubellm serve` on the GPU with 256 concurrent streaming clients.

Writes gpu_bench.py's checkpoint (same shape, seed and weights) plus a synthetic byte-level BPE
tokenizer that covers every id of the model's vocabulary, then for each `--api-server-count`
starts `kubellm serve` on it (one server at a time), waits for /ready, warms it up and runs the
issue's workload over HTTP: 256 streaming completions, all in flight at once from several client
processes, prompts given as token ids, exactly 512 new tokens each (`ignore_eos`), greedy. Then a
batch-1 latency case and a low-load TTFT case. stdout carries one JSON line per measurement and
nothing else; progress (and the server's own log) goes to stderr. Exit status 1 when a case
failed or a request did not complete.

    python3 bench/gpu_serve.py --offline-tokens-per-s 12658      # the issue's workload, CUDA
    python3 bench/gpu_serve.py --api-server-count 1,2 --offline-from gpu_bench.jsonl
    .venv/bin/python bench/gpu_serve.py --device cpu --tiny       # a CPU smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import psutil

import frontend_scaleout as fs
import gpu_bench as gb

logger = logging.getLogger("bench.gpu_serve")

ROOT = Path(__file__).resolve().parents[1]
SPECIAL_NAMES = ("<|endoftext|>", "<|im_end|>", "<|pad|>")
"""Contents given to the config's bos, eos and pad ids (in that order, one per distinct id)."""
MERGE_ALPHABET = (
    " etaoinshrdlucmfwypvbgkqjxzETAOINSHRDLUCMFWYPVBGKQJXZ0123456789"
    ".,;:!?'\"-()[]{}<>/\\|@#$%^&*_+=~`"
)
"""The 95 printable ASCII characters, roughly by English frequency: merged tokens are pairs of
them, then a pair followed by one more (enough for 151,936 ids)."""
STOP_TIMEOUT_S = 60.0
"""How long the server may take to shut down after SIGTERM before it is killed."""


@dataclass(frozen=True)
class ServePlan:
    """Sizes of every case: the issue's workload, or --tiny's CPU smoke run."""

    num_requests: int
    prompt_len: tuple[int, int]
    output_len: int
    concurrency: int
    client_processes: int
    latency_prompt: int = 128
    latency_tokens: int = 256
    ttft_prompt: int = 1024
    ttft_reps: int = 5
    max_num_batched_tokens: int = 16384
    kv_cache_memory_gib: float = 4.0  # CPU only; CUDA sizes the cache from free memory

    @classmethod
    def for_args(cls, args: argparse.Namespace) -> ServePlan:
        if args.tiny:
            return cls(
                num_requests=8,
                prompt_len=(10, 40),
                output_len=8,
                concurrency=4,
                client_processes=min(2, args.client_processes),
                latency_prompt=16,
                latency_tokens=8,
                ttft_prompt=40,
                ttft_reps=2,
                max_num_batched_tokens=256,
                kv_cache_memory_gib=0.05,
            )
        return cls(
            num_requests=256,
            prompt_len=(100, 1024),
            output_len=512,
            concurrency=256,
            client_processes=args.client_processes,
        )

    @property
    def max_model_len(self) -> int:
        """1536 for the issue's workload, as in gpu_bench.py's offline run."""
        return max(
            self.prompt_len[1] + self.output_len,
            self.latency_prompt + self.latency_tokens,
            self.ttft_prompt + 1,
        )


# ---- arguments ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny model and workload (CPU test)")
    parser.add_argument(
        "--api-server-count",
        default="1",
        help="API server processes; a comma-separated list runs one server shape after another",
    )
    parser.add_argument("--client-processes", type=int, default=8, help="load generators")
    parser.add_argument(
        "--offline-tokens-per-s",
        type=float,
        default=None,
        help="gpu_bench.py's offline throughput on the same device, for a side-by-side line",
    )
    parser.add_argument(
        "--offline-from",
        default=None,
        metavar="JSONL",
        help="take --offline-tokens-per-s from gpu_bench.py's output: its first complete "
        "kubellm.<variant>.throughput line (a warning, not an error, when there is none)",
    )
    parser.add_argument("--attention-backend", choices=("auto", "torch", "triton"), default=None)
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    parser.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="one more argument for `kubellm serve` (repeatable; write it as "
        "--serve-arg=--flag), e.g. --serve-arg=--no-enable-prefix-caching",
    )
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--ready-timeout-s", type=float, default=300.0)
    parser.add_argument("--workdir", default=None, help="where to write the checkpoint")
    args = parser.parse_args(argv)
    try:
        args.api_server_count = [int(c) for c in args.api_server_count.split(",") if c.strip()]
    except ValueError:
        parser.error(f"--api-server-count: not a list of integers: {args.api_server_count!r}")
    if not args.api_server_count or min(args.api_server_count) < 1:
        parser.error("--api-server-count: give one or more counts of at least 1")
    if args.offline_from is not None:
        try:
            args.offline_tokens_per_s = offline_tokens_per_s(Path(args.offline_from))
        except (OSError, ValueError) as exc:  # the online numbers are still worth a run
            logger.warning("--offline-from: %s; no vs_offline line", exc)
    if args.client_processes < 1 or args.max_num_seqs < 1:
        parser.error("--client-processes and --max-num-seqs must be positive")
    return args


def offline_tokens_per_s(path: Path) -> float:
    """tokens_per_s of the first kubellm.<variant>.throughput line of gpu_bench.py's output
    that ran to the end."""
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line) if line.strip() else {}
        name = str(record.get("name", ""))
        complete = record.get("tokens_per_s") and not record.get("aborted")
        if name.startswith("kubellm.") and name.endswith(".throughput") and complete:
            return float(record["tokens_per_s"])
    raise ValueError(f"{path} has no complete kubellm.<variant>.throughput line")


# ---- the synthetic tokenizer ----------------------------------------------------------------


def byte_chars() -> list[str]:
    """GPT-2's byte-level alphabet: the printable stand-in character of each byte 0..255."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    out, extra = [], 0
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def special_tokens(cfg: dict[str, Any]) -> dict[int, str]:
    """id → content of the config's bos, eos and pad tokens."""
    vocab = int(cfg["vocab_size"])
    out: dict[int, str] = {}
    for key, name in zip(
        ("bos_token_id", "eos_token_id", "pad_token_id"), SPECIAL_NAMES, strict=True
    ):
        tid = cfg.get(key)
        if tid is None or tid in out:
            continue
        if not 0 <= int(tid) < vocab:
            raise ValueError(f"{key} {tid} is outside the vocabulary (size {vocab})")
        out[int(tid)] = name
    return out


def _merge_pairs() -> itertools.chain[tuple[str, str]]:
    """Merges in rank order: every pair of MERGE_ALPHABET, then every pair + one character."""
    table = byte_chars()
    chars = [table[ord(c)] for c in MERGE_ALPHABET]
    pairs = ((a, b) for a in chars for b in chars)
    triples = ((a + b, c) for a in chars for b in chars for c in chars)
    return itertools.chain(pairs, triples)


def build_tokenizer(cfg: dict[str, Any]) -> Any:
    """A byte-level BPE `tokenizers.Tokenizer` with exactly `cfg["vocab_size"]` ids: the
    config's special tokens at their ids, the 256 byte tokens and merged ASCII tokens in the
    others (in id order). Deterministic; not a good tokenizer, but every id decodes."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    specials = special_tokens(cfg)
    free = [i for i in range(int(cfg["vocab_size"])) if i not in specials]
    if len(free) < 256:
        raise ValueError(f"vocab_size {cfg['vocab_size']} leaves no room for the 256 byte tokens")
    merges = list(itertools.islice(_merge_pairs(), len(free) - 256))
    if len(merges) < len(free) - 256:
        raise ValueError(f"vocab_size {cfg['vocab_size']} is larger than this tokenizer can fill")
    pieces = byte_chars() + [a + b for a, b in merges]
    vocab = dict(zip(pieces, free, strict=True))
    vocab.update({content: tid for tid, content in specials.items()})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [AddedToken(c, special=True, normalized=False) for c in specials.values()]
    )
    return tok


def write_tokenizer(out_dir: Path, cfg: dict[str, Any]) -> None:
    """tokenizer.json and tokenizer_config.json next to the checkpoint."""
    started = time.perf_counter()
    build_tokenizer(cfg).save(str(out_dir / "tokenizer.json"))
    names = special_tokens(cfg)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": names.get(cfg.get("bos_token_id", -1)),
        "eos_token": names.get(cfg.get("eos_token_id", -1)),
        "pad_token": names.get(cfg.get("pad_token_id", -1)),
        "add_bos_token": False,
        "model_max_length": int(cfg["max_position_embeddings"]),
    }
    text = json.dumps(config, indent=2) + "\n"
    (out_dir / "tokenizer_config.json").write_text(text, encoding="utf-8")
    logger.info("tokenizer: %d ids in %.1f s", cfg["vocab_size"], gb._since(started))


def write_model(out_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """gpu_bench.py's checkpoint (same config, seed and device kind: the same weights) plus the
    tokenizer; returns the model config."""
    cfg = dict(gb.QWEN3_0_6B)
    if args.tiny:
        cfg.update(gb.TINY_OVERRIDES)
        cfg["num_hidden_layers"] = 2
    gb.write_checkpoint(out_dir, cfg, args.seed, args.device)
    gb.free_memory()
    write_tokenizer(out_dir, cfg)
    return cfg


# ---- the server -----------------------------------------------------------------------------


def serve_command(
    args: argparse.Namespace, plan: ServePlan, model_dir: Path, port: int, api_servers: int
) -> list[str]:
    """`python -m kubellm.server.cli serve ...` with gpu_bench.py's engine settings."""
    batched = args.max_num_batched_tokens or plan.max_num_batched_tokens
    command = [sys.executable, "-m", "kubellm.server.cli", "serve", str(model_dir)]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    command += ["--api-server-count", str(api_servers), "--disable-uvicorn-access-log"]
    command += ["--device", args.device, "--dtype", args.dtype, "--seed", str(args.seed)]
    command += ["--max-num-seqs", str(args.max_num_seqs)]
    command += ["--max-num-batched-tokens", str(batched)]
    command += ["--max-model-len", str(plan.max_model_len)]
    command += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    command += ["--kv-cache-memory-gib", str(plan.kv_cache_memory_gib)]
    if args.attention_backend:
        command += ["--attention-backend", args.attention_backend]
    if args.enforce_eager:
        command += ["--enforce-eager"]
    return command + args.serve_arg


def server_environment(device: str) -> dict[str, str]:
    """This checkout's sources first on PYTHONPATH (the device has no kubellm installed)."""
    sources = [str(ROOT / part / "src") for part in ("protocol", "engine", "server")]
    path = os.pathsep.join([*sources, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}
    if device == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    return env


def start_server(command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    """The server's stdout and stderr go to our stderr (stdout is kept for JSON lines)."""
    logger.info("starting: %s", " ".join(command))
    return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=2, stderr=2, env=env)


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, wait, then SIGKILL; then kill whatever the server left (its engine runs in a
    process group of its own, so it is killed by pid)."""
    tree = descendants(proc)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            logger.warning("server %d did not stop in %.0f s: killing it", proc.pid, STOP_TIMEOUT_S)
            tree += descendants(proc)
            proc.kill()
            proc.wait()
    _, alive = psutil.wait_procs(tree, timeout=10)
    for child in alive:
        logger.warning("killing leftover server process %d", child.pid)
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(alive, timeout=5)


def descendants(proc: subprocess.Popen[bytes]) -> list[psutil.Process]:
    try:
        return list(psutil.Process(proc.pid).children(recursive=True))
    except psutil.NoSuchProcess:
        return []


def engine_processes(proc: subprocess.Popen[bytes]) -> list[psutil.Process]:
    out = []
    for child in descendants(proc):
        with contextlib.suppress(psutil.NoSuchProcess):
            if fs.is_engine_process(child):
                out.append(child)
    return out


# ---- requests and statistics ----------------------------------------------------------------


def completion_body(model: str, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    """Greedy, exactly `max_tokens` new tokens (EOS ignored), streamed with a usage chunk."""
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


def trace_fields(traces: list[fs.StreamTrace], output_len: int) -> dict[str, Any]:
    """Counts, TTFT and inter-chunk latency (each stream's gaps, pooled) over the traces."""
    ok = [t for t in traces if t.ok]
    exact = [t for t in ok if t.completion_tokens == output_len]
    ttfts = [t.chunk_times[0] - t.sent for t in ok if t.chunk_times]
    gaps = [b - a for t in ok for a, b in itertools.pairwise(t.chunk_times)]
    chunks = sum(len(t.chunk_times) for t in ok)
    tokens = sum(t.completion_tokens for t in ok)
    out: dict[str, Any] = {
        "num_requests": len(traces),
        "complete": len(exact),
        "all_lengths_exact": len(exact) == len(traces),
        "failed": len(traces) - len(ok),
        "errors": sorted({t.error for t in traces if t.error})[:5],
        "prompt_tokens": sum(t.prompt_tokens for t in ok),
        "output_tokens": tokens,
        "content_chunks": chunks,
        "tokens_per_chunk": round(tokens / chunks, 3) if chunks else None,
    }
    if ttfts:
        out.update(
            ttft_median_ms=ms(statistics.median(ttfts)), ttft_p99_ms=ms(percentile(ttfts, 0.99))
        )
    if gaps:
        out.update(
            itl_mean_ms=ms(statistics.fmean(gaps)),
            itl_median_ms=ms(statistics.median(gaps)),
            itl_p99_ms=ms(percentile(gaps, 0.99)),
        )
    return out


# ---- the cases ------------------------------------------------------------------------------


@dataclass
class Server:
    """One running `kubellm serve` and what every case against it needs."""

    proc: subprocess.Popen[bytes]
    url: str
    model: str
    prefix: str
    """The JSON lines' name prefix, e.g. `serve.api1`."""
    plan: ServePlan
    vocab: int
    seed: int

    def stream(self, prompts: list[list[int]], max_tokens: int) -> list[fs.StreamTrace]:
        """In this process, one request after another (the low-load cases)."""
        bodies = [completion_body(self.model, p, max_tokens) for p in prompts]
        return asyncio.run(fs.drive_bodies(self.url, bodies, 1))


def warm_up(server: Server) -> None:
    """Compile kernels outside the timed runs: a full batch of short prompts, then long ones
    (distinct random prompts, so the prefix cache holds nothing of the workload)."""
    started = time.perf_counter()
    plan = server.plan
    batch = gb.random_prompts([16] * plan.concurrency, server.vocab, server.seed + 100)
    bodies = [completion_body(server.model, p, 4) for p in batch]
    traces = fs.drive_bodies_in_processes(server.url, bodies, plan.client_processes, None, 0.5)
    long = [plan.prompt_len[1], plan.prompt_len[0], plan.ttft_prompt]
    traces += server.stream(gb.random_prompts(long, server.vocab, server.seed + 101), 2)
    failed = [t.error for t in traces if not t.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} warm-up requests failed, e.g. {failed[0]}")
    logger.info("warm-up: %d requests in %.1f s", len(traces), gb._since(started))


def throughput_case(
    server: Server, work: gb.Workload, em: gb.Emitter, extra: dict[str, Any]
) -> float | None:
    """The workload, every request in flight at once; output tokens/s (None when incomplete)."""
    plan = server.plan
    bodies = [completion_body(server.model, p, work.output_len) for p in work.prompts]
    api = fs.api_server_processes(server.proc)
    engines = engine_processes(server.proc)
    api_cpu, engine_cpu = fs.cpu_seconds(api), fs.cpu_seconds(engines)
    logger.info(
        "%s: %d streams from %d client processes", server.prefix, len(bodies), plan.client_processes
    )
    traces = fs.drive_bodies_in_processes(
        server.url, bodies, plan.client_processes, plan.concurrency
    )
    api_cpu, engine_cpu = fs.cpu_seconds(api) - api_cpu, fs.cpu_seconds(engines) - engine_cpu
    ok = [t for t in traces if t.ok]
    seconds = max((t.done for t in ok), default=0.0) - min(t.sent for t in traces)
    fields = trace_fields(traces, work.output_len)
    tokens = fields["output_tokens"]
    em.emit(
        server.prefix + ".throughput",
        **fields,
        workload_prompt_tokens=work.prompt_tokens,
        seconds=round(seconds, 4),
        tokens_per_s=round(tokens / seconds, 2) if seconds > 0 else None,
        requests_per_s=round(fields["complete"] / seconds, 3) if seconds > 0 else None,
        concurrency=plan.concurrency,
        client_processes=plan.client_processes,
        api_server_processes=len(api),
        api_server_cpu_s=round(api_cpu, 3),
        api_server_cpu_us_per_token=round(1e6 * api_cpu / max(1, tokens), 2),
        engine_cpu_s=round(engine_cpu, 3),
        **extra,
    )
    if not fields["all_lengths_exact"]:
        em.error(
            server.prefix + ".throughput.check",
            f"only {fields['complete']}/{len(traces)} requests complete",
        )
        return None
    return tokens / seconds


def latency_case(server: Server, em: gb.Emitter) -> None:
    """Batch 1: one stream, gpu_bench.py's latency prompt; TTFT and inter-chunk latency."""
    plan = server.plan
    prompt = gb.random_prompts([plan.latency_prompt], server.vocab, server.seed + 2)
    (trace,) = server.stream(prompt, plan.latency_tokens)
    name = server.prefix + ".latency"
    if not trace.ok or not trace.chunk_times:
        em.error(name, trace.error or "no content chunk came back")
        return
    seconds = trace.done - trace.sent
    em.emit(
        name,
        batch_size=1,
        prompt_tokens=trace.prompt_tokens,
        output_tokens=trace.completion_tokens,
        all_lengths_exact=trace.completion_tokens == plan.latency_tokens,
        content_chunks=len(trace.chunk_times),
        seconds=round(seconds, 4),
        tokens_per_s=round(trace.completion_tokens / seconds, 2),
        **gb.latency_fields(trace.chunk_times, trace.sent),
    )


def ttft_case(server: Server, em: gb.Emitter) -> None:
    """Low load: a `ttft_prompt`-token prompt alone, one new token, `ttft_reps` times (distinct
    prompts); the time from sending the request to the end of its stream."""
    plan = server.plan
    prompts = gb.random_prompts([plan.ttft_prompt] * plan.ttft_reps, server.vocab, server.seed + 3)
    traces = server.stream(prompts, 1)
    name = server.prefix + ".ttft"
    failed = [t.error for t in traces if not t.ok]
    if failed:
        em.error(name, failed[0])
        return
    times = [t.done - t.sent for t in traces]
    em.emit(
        name,
        prompt_tokens=plan.ttft_prompt,
        reps=len(times),
        ttft_mean_ms=ms(statistics.fmean(times)),
        ttft_p50_ms=ms(percentile(times, 0.5)),
        ttft_min_ms=ms(min(times)),
        note="whole 1-token request: HTTP + prefill + first token + end of stream",
    )


def offline_line(online: float | None, offline: float | None, prefix: str, em: gb.Emitter) -> None:
    if offline is None:
        return
    em.emit(
        prefix + ".vs_offline",
        online_tokens_per_s=None if online is None else round(online, 2),
        offline_tokens_per_s=offline,
        ratio=None if online is None else round(online / offline, 4),
    )


# ---- orchestration --------------------------------------------------------------------------


@dataclass
class Bench:
    """What every server shape shares."""

    args: argparse.Namespace
    plan: ServePlan
    model_dir: Path
    work: gb.Workload
    vocab: int
    out: TextIO
    common: dict[str, Any]
    """Fields every JSON line carries (device, versions)."""
    failed: bool = False


def run_shape(bench: Bench, api_servers: int) -> None:
    """One server shape: start, warm up, the cases, stop (always)."""
    args, plan = bench.args, bench.plan
    em = gb.Emitter(bench.out, {**bench.common, "api_servers": api_servers})
    prefix = f"serve.api{api_servers}"
    port = fs.free_port()
    command = serve_command(args, plan, bench.model_dir, port, api_servers)
    started = time.perf_counter()
    proc = start_server(command, server_environment(args.device))
    try:
        url = f"http://127.0.0.1:{port}"
        fs.wait_ready(url, proc, args.ready_timeout_s)
        ready_s = gb._since(started)
        logger.info("%s: ready in %.1f s", prefix, ready_s)
        server = Server(proc, url, fs.served_model(url), prefix, plan, bench.vocab, args.seed)
        warm_up(server)
        extra = {"server_ready_s": round(ready_s, 2), "serve_flags": command[5:]}
        online = throughput_case(server, bench.work, em, extra)
        latency_case(server, em)
        ttft_case(server, em)
        offline_line(online, args.offline_tokens_per_s, prefix, em)
    except Exception as exc:  # one broken shape must not cost the others' numbers
        logger.exception("%s failed", prefix)
        em.error(prefix, f"{type(exc).__name__}: {exc}")
    finally:
        stop_server(proc)
    bench.failed = bench.failed or em.failed


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    gb.use_this_checkout()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    signal.signal(signal.SIGTERM, _interrupt)  # so that `finally` stops the server
    with gb.json_only_stdout() as out:
        return _main(args, out)


def _main(args: argparse.Namespace, out: TextIO) -> int:
    plan = ServePlan.for_args(args)
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="kubellm-serve-bench-") as tmp:
        model_dir = Path(tmp) / "model"
        cfg = write_model(model_dir, args)
        vocab = int(cfg["vocab_size"])
        work = gb.make_workload(
            plan.num_requests, plan.prompt_len, plan.output_len, vocab, args.seed
        )
        bench = Bench(args, plan, model_dir, work, vocab, out, gb.environment(args.device))
        gb.Emitter(out, bench.common).emit(
            "workload",
            model={k: cfg[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers")},
            num_requests=len(work.prompts),
            prompt_tokens=work.prompt_tokens,
            prompt_len_range=list(plan.prompt_len),
            output_len=work.output_len,
            concurrency=plan.concurrency,
            client_processes=plan.client_processes,
            api_server_counts=args.api_server_count,
            dtype=args.dtype,
            seed=args.seed,
        )
        for count in args.api_server_count:
            run_shape(bench, count)
    return 1 if bench.failed else 0


if __name__ == "__main__":
    sys.exit(main())
