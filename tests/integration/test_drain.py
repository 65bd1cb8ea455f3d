"""Graceful scale-down: SIGTERM to a headless engine host while it streams a request.

A head (`--data-parallel-size-local 0`) and two headless hosts on separate addresses (see
`test_data_parallel.py`, whose helpers this reuses). The host serving a long stream gets
SIGTERM, as Kubernetes sends it when `kubectl scale` removes the pod: its engine drains (design
note 0003, "Draining"), the stream completes, the host exits 0 and the other engine takes new
work.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import RemoteServer
from netns import Network, network
from test_data_parallel import (
    complete,
    engine_tokens,
    free_ports,
    start_engine,
    start_head,
    stop_all,
    wait_exit,
    wait_ready,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DRAIN_S = 30
STREAM_TOKENS = 400
"""At 10 ms a token: a stream of about 4 s, far shorter than the drain timeout."""


@pytest.fixture(scope="module")
def net() -> Iterator[Network]:
    with network(2) as made:
        yield made


def running_engine(head: RemoteServer, timeout: float = 20.0) -> int:
    """The rank whose vllm:num_requests_running is > 0 on the head's /metrics."""
    pattern = re.compile(r'^vllm:num_requests_running\{[^}]*engine="(\d+)"[^}]*\} (\S+)$', re.M)
    deadline = time.monotonic() + timeout
    with head.http(timeout=5.0) as http:
        while time.monotonic() < deadline:
            busy = [int(r) for r, v in pattern.findall(http.get("/metrics").text) if float(v) > 0]
            if len(busy) == 1:
                return busy[0]
            time.sleep(0.05)
    pytest.fail(f"no single busy engine within {timeout} s\n{head.log_text()}")


def test_sigterm_to_the_serving_host_loses_no_request(
    tiny_tokenizer_dir: Path, net: Network
) -> None:
    rpc = free_ports(net.head.ip, 3)
    head = start_head(tiny_tokenizer_dir, net, rpc)
    drain = ("--shutdown-timeout", str(DRAIN_S))
    engines = [
        start_engine(tiny_tokenizer_dir, net, rpc, rank, *drain, behaviour="token_delay_s=0.01")
        for rank in (0, 1)
    ]
    try:
        wait_ready(head, 200)
        with ThreadPoolExecutor(1) as pool:
            stream = pool.submit(complete, head, STREAM_TOKENS, True)
            victim = running_engine(head)
            engines[victim].terminate()
            with engines[victim].http(timeout=5.0) as http:
                ready, health = http.get("/ready"), http.get("/health")
            assert stream.result(timeout=60) == STREAM_TOKENS  # finish_reason "length" too
        assert (ready.status_code, health.status_code) == (503, 200), ready.text + health.text
        code, _ = wait_exit(engines[victim], 30)
        assert code == 0, engines[victim].log_text()
        log = head.log_text()
        assert f"engine {victim} draining (deadline {DRAIN_S} s)" in log, log
        body = wait_ready(head, 503).json()
        assert "1 of 2 engines ready" in body["error"]["message"]
        survivor = str(1 - victim)
        before = engine_tokens(head).get(survivor, 0.0)
        assert complete(head, 8) == 8
        assert engine_tokens(head).get(survivor, 0.0) == before + 8
    finally:
        stop_all(*engines, head)
