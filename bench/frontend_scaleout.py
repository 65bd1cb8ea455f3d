"""Front-end throughput: `kubellm serve` with 1 and with N API server processes.

The engine is the dummy backend with no delay, so the engine costs almost nothing and what is
measured is the API servers: HTTP, JSON, SSE framing, detokenization and the engine link. For
each API server count it starts a server, warms it up, runs a fixed set of streaming completions
from `--concurrency` concurrent clients, and prints one JSON line: requests/s, output tokens/s,
time to first token, and the CPU seconds the API server processes spent per output token (the
front-end's cost per token; the engine's and the load generator's CPU are not counted).

    .venv/bin/python bench/frontend_scaleout.py --api-servers 1,4 --concurrency 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil


def kubellm_command() -> list[str]:
    """`kubellm` of this environment, else the one on PATH, else `python -m`."""
    here = Path(sys.executable).parent / "kubellm"
    if here.is_file():
        return [str(here)]
    found = shutil.which("kubellm")
    return [found] if found else [sys.executable, "-m", "kubellm.server.cli"]


@dataclass
class Result:
    tokens: int
    ttft: float
    ok: bool


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(
    args: argparse.Namespace, api_servers: int, port: int, log: Path
) -> subprocess.Popen[bytes]:
    command = [
        *kubellm_command(),
        "serve",
        *([args.model] if args.model else []),
        "--engine-backend",
        "dummy",
        "--api-server-count",
        str(api_servers),
        "--data-parallel-size",
        str(args.engines),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-num-seqs",
        str(max(64, args.concurrency)),
        "--disable-uvicorn-access-log",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("wb") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"kubellm serve exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/ready", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the server did not become ready")


def api_server_processes(proc: subprocess.Popen[bytes]) -> list[psutil.Process]:
    """The processes that run API servers: the top process and its non-engine children."""
    top = psutil.Process(proc.pid)
    procs = [top]
    for child in top.children(recursive=True):
        try:
            if not is_engine_process(child):
                procs.append(child)
        except psutil.NoSuchProcess:
            continue
    return procs


def is_engine_process(proc: psutil.Process) -> bool:
    """An engine core: the `kubellm-engine` script or `python -m kubellm.engine.cli`."""
    command = " ".join(proc.cmdline())
    return "kubellm-engine" in command or "kubellm.engine.cli" in command


def cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            continue
    return total


async def one_stream(client: httpx.AsyncClient, model: str, max_tokens: int) -> Result:
    """One streaming completion; tokens are the usage count of its last chunk."""
    body = {"model": model, "prompt": "Tell me about rivers.", "max_tokens": max_tokens,
            "stream": True, "temperature": 0,
            "stream_options": {"include_usage": True}}  # fmt: skip
    trace = await stream_completion(client, body)
    ttft = trace.chunk_times[0] - trace.sent if trace.chunk_times else 0.0
    return Result(trace.completion_tokens, ttft, trace.ok)


async def drive(
    url: str, model: str, requests: int, concurrency: int, max_tokens: int
) -> list[Result]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=300.0) as client:
        queue = list(range(requests))

        async def worker() -> list[Result]:
            out = []
            while queue:
                queue.pop()
                out.append(await one_stream(client, model, max_tokens))
            return out

        batches = await asyncio.gather(*(worker() for _ in range(concurrency)))
    return [r for batch in batches for r in batch]


def drive_in_process(
    url: str, model: str, requests: int, concurrency: int, max_tokens: int
) -> list[tuple[int, float, bool]]:
    """One load-generator process (the client side must not be the bottleneck)."""
    results = asyncio.run(drive(url, model, requests, concurrency, max_tokens))
    return [(r.tokens, r.ttft, r.ok) for r in results]


def drive_processes(args: argparse.Namespace, url: str, model: str) -> list[Result]:
    k = max(1, args.client_processes)
    with ProcessPoolExecutor(k) as pool:
        futures = [
            pool.submit(
                drive_in_process,
                url,
                model,
                args.requests // k + (1 if i < args.requests % k else 0),
                max(1, args.concurrency // k),
                args.max_tokens,
            )
            for i in range(k)
        ]
        return [Result(*r) for f in futures for r in f.result()]


@dataclass
class StreamTrace:
    """One streaming completion as the client saw it; times are time.monotonic() (one clock
    for every process of the host, so traces from several client processes compare)."""

    ok: bool
    sent: float
    chunk_times: list[float]
    """When each chunk with non-empty text arrived."""
    completion_tokens: int
    prompt_tokens: int
    error: str = ""
    done: float = 0.0
    """When the stream ended (0.0 when it failed)."""


async def stream_completion(client: httpx.AsyncClient, body: dict[str, Any]) -> StreamTrace:
    """POST one streaming completion (`body` must ask for `stream_options.include_usage`) and
    record when each content chunk arrived and the final usage."""
    trace = StreamTrace(False, time.monotonic(), [], 0, 0)
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            trace.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
            return trace
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                trace.error = str(chunk["error"])[:200]
                return trace
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                trace.chunk_times.append(time.monotonic())
            if chunk.get("usage"):
                trace.completion_tokens = int(chunk["usage"]["completion_tokens"])
                trace.prompt_tokens = int(chunk["usage"]["prompt_tokens"])
    trace.ok, trace.done = True, time.monotonic()
    return trace


async def drive_bodies(
    url: str, bodies: list[dict[str, Any]], concurrency: int, timeout: float = 600.0
) -> list[StreamTrace]:
    """Stream every body with at most `concurrency` requests in flight; traces in body order."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:

        async def one(body: dict[str, Any]) -> StreamTrace:
            async with gate:
                try:
                    return await stream_completion(client, body)
                except httpx.HTTPError as exc:
                    return StreamTrace(False, time.monotonic(), [], 0, 0, repr(exc))

        return list(await asyncio.gather(*(one(b) for b in bodies)))


def drive_bodies_in_process(url: str, bodies_json: str, concurrency: int, start_at: float) -> str:
    """One load-generator process: waits until time.monotonic() reaches `start_at` (so that
    every process starts together), streams the bodies, and returns the traces as JSON
    (plain strings in and out of the process pool)."""
    bodies = json.loads(bodies_json)
    time.sleep(max(0.0, start_at - time.monotonic()))
    traces = asyncio.run(drive_bodies(url, bodies, concurrency))
    return json.dumps([asdict(t) for t in traces])


def drive_bodies_in_processes(
    url: str,
    bodies: list[dict[str, Any]],
    processes: int,
    concurrency: int | None = None,
    start_delay_s: float = 2.0,
) -> list[StreamTrace]:
    """Stream the bodies from `processes` load generators (dealt round-robin), with
    `concurrency` requests in flight in all (None: every body at once); traces in body order."""
    k = max(1, min(processes, len(bodies)))
    per_process = -(-(concurrency or len(bodies)) // k)
    shares = [bodies[i::k] for i in range(k)]
    start_at = time.monotonic() + start_delay_s
    # spawn: the caller may hold threads and a CUDA context, which fork does not copy safely
    with ProcessPoolExecutor(k, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [
            pool.submit(drive_bodies_in_process, url, json.dumps(s), per_process, start_at)
            for s in shares
        ]
        results = [[StreamTrace(**t) for t in json.loads(f.result())] for f in futures]
    traces = [StreamTrace(False, 0.0, [], 0, 0, "not run") for _ in bodies]
    for i, share in enumerate(results):
        traces[i::k] = share
    return traces


def served_model(url: str) -> str:
    return str(httpx.get(url + "/v1/models", timeout=5.0).json()["data"][0]["id"])


def measure(args: argparse.Namespace, api_servers: int) -> dict[str, object]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(tempfile.mkdtemp(prefix="kubellm-bench-")) / "serve.log"
    proc = start_server(args, api_servers, port, log)
    try:
        wait_ready(url, proc)
        model = served_model(url)
        asyncio.run(drive(url, model, args.concurrency, args.concurrency, 8))  # warm-up
        procs = api_server_processes(proc)
        cpu_before = cpu_seconds(procs)
        started = time.perf_counter()
        results = drive_processes(args, url, model)
        elapsed = time.perf_counter() - started
        cpu = cpu_seconds(procs) - cpu_before
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    ok = [r for r in results if r.ok and r.tokens == args.max_tokens]
    tokens = sum(r.tokens for r in results)
    ttfts = sorted(r.ttft for r in ok) or [0.0]
    return {
        "api_servers": api_servers,
        "engines": args.engines,
        "concurrency": args.concurrency,
        "requests": len(results),
        "complete": len(ok),
        "seconds": round(elapsed, 2),
        "requests_per_s": round(len(ok) / elapsed, 1),
        "output_tokens_per_s": round(tokens / elapsed, 0),
        "ttft_median_ms": round(1000 * statistics.median(ttfts), 1),
        "ttft_p99_ms": round(1000 * ttfts[int(0.99 * (len(ttfts) - 1))], 1),
        "api_server_cpu_us_per_token": round(1e6 * cpu / max(1, tokens), 1),
        "api_server_processes": len(procs),
        "client_processes": args.client_processes,
        "cpus": os.cpu_count(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--api-servers", default="1,4", help="API server counts to compare")
    parser.add_argument("--engines", type=int, default=1, help="dummy engine cores")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--model", default=None, help="tokenizer directory (default: embedded)")
    parser.add_argument("--client-processes", type=int, default=4, help="load-generator processes")
    args = parser.parse_args()
    for count in (int(c) for c in args.api_servers.split(",")):
        print(json.dumps(measure(args, count)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
