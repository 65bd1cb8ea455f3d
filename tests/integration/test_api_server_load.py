"""`--api-server-count 4` under many concurrent streaming clients: every request is answered in
full, by more than one API server process, and the processes all end cleanly.

One test serves the embedded CPU model (SmolLM2-135M-Instruct, the README's default), one the
dummy engine with many more clients than the model test can afford on CI's 2 cores. Throughput is
not asserted here; bench/frontend_scaleout.py measures it.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import openai
import pytest
from conftest import RemoteServer, dummy_args

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SMALL = ["--device", "cpu", "--max-model-len", "512", "--kv-cache-memory-gib", "0.25"]
FOUR = ["--api-server-count", "4"]


async def stream_all(
    server: RemoteServer, model: str, clients: int, requests: int, max_tokens: int
) -> list[tuple[int, str | None]]:
    """`requests` streaming completions from `clients` concurrent connections; per request the
    usage count of its last chunk and its finish reason."""
    results: list[tuple[int, str | None]] = []
    pending = list(range(requests))

    async def client_loop(client: openai.AsyncOpenAI) -> None:
        while pending:
            i = pending.pop()
            tokens, finish = 0, None
            stream = await client.completions.create(
                model=model,
                prompt=f"Request {i}: tell me about rivers.",
                max_tokens=max_tokens,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
            async with stream:
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].finish_reason:
                        finish = chunk.choices[0].finish_reason
                    if chunk.usage is not None:
                        tokens = chunk.usage.completion_tokens
            results.append((tokens, finish))

    async with server.async_client(max_retries=0, timeout=300.0) as client:
        # one client object, many connections: the pool opens one per concurrent stream
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
    return results


def check_all_answered(results: list[tuple[int, str | None]], requests: int, tokens: int) -> None:
    assert len(results) == requests
    assert all(r == (tokens, "length") for r in results), [r for r in results if r[1] != "length"]


def test_four_api_servers_answer_every_stream_of_a_cpu_model() -> None:
    with RemoteServer([*SMALL, *FOUR], timeout=600) as server:
        results = asyncio.run(
            stream_all(server, "SmolLM2-135M-Instruct", clients=24, requests=48, max_tokens=12)
        )
        check_all_answered(results, 48, 12)
        with server.http(timeout=5.0) as http:
            metrics = http.get("/metrics").text
        # the multi shape's /metrics sums all API server processes
        done = re.findall(
            r'^vllm:request_success_total\{[^}]*"length"[^}]*\} (\S+)$', metrics, re.M
        )
        assert sum(float(v) for v in done) == 48


def test_four_api_servers_answer_hundreds_of_concurrent_streams(tiny_tokenizer_dir: Path) -> None:
    args = dummy_args(tiny_tokenizer_dir, *FOUR, "--max-num-seqs", "256")
    with RemoteServer(args) as server:
        results = asyncio.run(stream_all(server, "tiny", clients=200, requests=600, max_tokens=32))
        check_all_answered(results, 600, 32)
