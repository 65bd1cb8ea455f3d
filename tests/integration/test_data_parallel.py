"""A head and headless engines as separate processes on separate network addresses.

The head (`--data-parallel-size-local 0`) runs the API server and binds its engine sockets on the
bridge address of a test network; each headless engine runs inside its own network namespace
(see `netns.py`; distinct 127.0.0.x addresses where namespaces cannot be made) and dials the
head. The tests drive the head with the `openai` client, kill engines and the head, and check
what the other side does.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from conftest import KUBELLM, RemoteServer, dummy_args
from netns import Host, Network, network

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HEARTBEAT = ["--heartbeat-interval-s", "0.2"]
ENGINE_TIMEOUT_S = 2.0
HEAD_TIMEOUT_S = 3.0


@pytest.fixture(scope="module")
def net() -> Iterator[Network]:
    with network(2) as made:
        if not made.isolated:
            print(f"falling back to loopback addresses: {made.why}")
        yield made


def free_ports(host: str, count: int) -> int:
    """A port P such that P..P+count-1 are free on `host` (the head's registration port and
    its API server's two engine ports)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((host, 0))
            base = int(probe.getsockname()[1])
        if base + count > 65535:
            continue
        socks = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                socks.append(s)
                s.bind((host, port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {count} consecutive free ports on {host}")


def parallel_args(net: Network, rpc_port: int, size: int = 2) -> list[str]:
    return [
        "--data-parallel-size",
        str(size),
        "--data-parallel-address",
        net.head.ip,
        "--data-parallel-rpc-port",
        str(rpc_port),
        *HEARTBEAT,
    ]


def start_head(
    model: Path, net: Network, rpc_port: int, *extra: str, size: int = 2
) -> RemoteServer:
    args = dummy_args(
        model,
        *parallel_args(net, rpc_port, size),
        "--data-parallel-size-local",
        "0",
        "--api-server-count",
        "1",
        "--engine-heartbeat-timeout-s",
        str(ENGINE_TIMEOUT_S),
        *extra,
    )
    return RemoteServer(args).start()


def start_engine(
    model: Path,
    net: Network,
    rpc_port: int,
    rank: int,
    *extra: str,
    behaviour: str = "",
    size: int = 2,
    wait: bool = True,
) -> RemoteServer:
    host: Host = net.engines[rank]
    args = dummy_args(
        model,
        *parallel_args(net, rpc_port, size),
        "--headless",
        "--data-parallel-size-local",
        "1",
        "--data-parallel-start-rank",
        str(rank),
        "--head-timeout-s",
        str(HEAD_TIMEOUT_S),
        *extra,
        behaviour=behaviour,
    )
    return RemoteServer(args, host=host.ip, prefix=host.prefix, wait_healthy=wait).start()


def wait_ready(head: RemoteServer, expect: int, timeout: float = 30.0) -> httpx.Response:
    """Poll the head's /ready until it answers `expect`."""
    deadline = time.monotonic() + timeout
    with head.http(timeout=2.0) as http:
        while True:
            response = http.get("/ready")
            if response.status_code == expect:
                return response
            if time.monotonic() > deadline:
                pytest.fail(
                    f"/ready stayed {response.status_code}: {response.text}\n{head.log_text()}"
                )
            time.sleep(0.1)


def engine_tokens(head: RemoteServer) -> dict[str, float]:
    """vllm:generation_tokens per engine label, from the head's /metrics."""
    with head.http(timeout=5.0) as http:
        text = http.get("/metrics").text
    out: dict[str, float] = {}
    for match in re.finditer(
        r'^vllm:generation_tokens_total\{[^}]*engine="(\d+)"[^}]*\} (\S+)$', text, re.M
    ):
        out[match.group(1)] = float(match.group(2))
    return out


def complete(head: RemoteServer, max_tokens: int = 8, stream: bool = False) -> int:
    """One completion; returns the number of tokens received (closes what it opens, also
    when a stream breaks off with an error)."""
    with head.client(max_retries=0, timeout=60.0) as client:
        if not stream:
            result = client.completions.create(model="tiny", prompt="hello", max_tokens=max_tokens)
            assert result.usage is not None
            return result.usage.completion_tokens
        tokens = 0
        finish = None
        with client.completions.create(
            model="tiny",
            prompt="hello",
            max_tokens=max_tokens,
            stream=True,
            stream_options={"include_usage": True},
        ) as chunks:
            for chunk in chunks:
                if chunk.choices:
                    finish = chunk.choices[0].finish_reason or finish
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
    assert finish == "length"
    return tokens


def stop_all(*servers: RemoteServer | None) -> None:
    for server in servers:
        if server is not None:
            server.stop()


def wait_exit(server: RemoteServer, timeout: float) -> tuple[int | None, float]:
    started = time.monotonic()
    code = server.wait(timeout)
    return code, time.monotonic() - started


def test_head_serves_through_two_engines_on_other_addresses(
    tiny_tokenizer_dir: Path, net: Network
) -> None:
    rpc = free_ports(net.head.ip, 3)
    head = start_head(tiny_tokenizer_dir, net, rpc)
    engines: list[RemoteServer] = []
    try:
        not_ready = wait_ready(head, 503)
        assert "0 of 2 engines ready" in not_ready.json()["error"]["message"]
        with pytest.raises(openai.APIStatusError) as unavailable:
            complete(head)
        assert unavailable.value.status_code == 503
        engines = [start_engine(tiny_tokenizer_dir, net, rpc, rank) for rank in (0, 1)]
        ready = wait_ready(head, 200).json()
        assert ready["ready"] is True
        assert ready["engines"]["ready"] == 2
        for engine in engines:  # the engine hosts' own probe endpoint
            with engine.http(timeout=2.0) as http:
                assert http.get("/health").status_code == 200
                assert 'kubellm:engine_state{engine="' in http.get("/metrics").text
        with ThreadPoolExecutor(8) as pool:
            counts = list(pool.map(lambda _: complete(head, 16, stream=True), range(16)))
        assert counts == [16] * 16
        served = engine_tokens(head)
        assert served.get("0", 0) > 0 and served.get("1", 0) > 0, served
        with head.client() as client:
            chat = client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4
            )
        assert chat.choices[0].finish_reason == "length"
    finally:
        stop_all(*engines, head)


def test_sigkilled_engine_fails_only_its_requests_and_rejoins(
    tiny_tokenizer_dir: Path, net: Network
) -> None:
    rpc = free_ports(net.head.ip, 3)
    head = start_head(tiny_tokenizer_dir, net, rpc)
    behaviour = "token_delay_s=0.01"
    engines = [
        start_engine(tiny_tokenizer_dir, net, rpc, rank, behaviour=behaviour) for rank in (0, 1)
    ]
    rejoined: RemoteServer | None = None
    try:
        wait_ready(head, 200)
        victim = engines[1].engine_processes()
        assert len(victim) == 1

        def stream(_: int) -> str:
            try:
                return f"ok {complete(head, 300, stream=True)}"
            except openai.APIError as e:
                return f"error {type(e).__name__}: {e}"

        with ThreadPoolExecutor(12) as pool:
            futures = [pool.submit(stream, i) for i in range(12)]
            deadline = time.monotonic() + 20
            while engine_running(head) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            victim[0].send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            results = [f.result(timeout=60) for f in futures]
        failed = [r for r in results if r.startswith("error")]
        done = [r for r in results if r == "ok 300"]
        assert failed, results
        assert done, results
        assert len(failed) + len(done) == len(results), results
        print(
            f"{len(failed)} of {len(results)} streams failed, {time.monotonic() - killed_at:.1f} s"
        )
        code, _ = wait_exit(engines[1], 15)
        assert code not in (None, 0), "the headless host must exit non-zero after its engine died"
        body = wait_ready(head, 503).json()
        assert "1 of 2 engines ready" in body["error"]["message"]
        with ThreadPoolExecutor(4) as pool:  # the survivor takes all new work
            assert list(pool.map(lambda _: complete(head, 8), range(8))) == [8] * 8

        before = engine_tokens(head).get("1", 0.0)
        rejoined = start_engine(tiny_tokenizer_dir, net, rpc, 1, behaviour=behaviour)
        wait_ready(head, 200)
        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(lambda _: complete(head, 20), range(16))) == [20] * 16
        assert engine_tokens(head).get("1", 0.0) > before, "the restarted engine got no work"
    finally:
        stop_all(rejoined, *engines, head)


def engine_running(head: RemoteServer) -> int:
    """How many engines report running requests on the head's /metrics."""
    with head.http(timeout=5.0) as http:
        text = http.get("/metrics").text
    running = re.findall(r"^vllm:num_requests_running\{[^}]*\} (\S+)$", text, re.M)
    return sum(1 for value in running if float(value) > 0)


def wait_exits(servers: list[RemoteServer], timeout: float) -> list[tuple[int | None, float]]:
    """Each server's exit code and how long after the call it exited (None, timeout if not)."""
    started = time.monotonic()
    exits: dict[int, tuple[int | None, float]] = {}
    while len(exits) < len(servers) and time.monotonic() - started < timeout:
        for i, server in enumerate(servers):
            assert server.proc is not None
            if i not in exits and server.proc.poll() is not None:
                exits[i] = (server.proc.returncode, time.monotonic() - started)
        time.sleep(0.02)
    return [exits.get(i, (None, timeout)) for i in range(len(servers))]


def test_engines_exit_non_zero_soon_after_the_head_dies(
    tiny_tokenizer_dir: Path, net: Network
) -> None:
    rpc = free_ports(net.head.ip, 3)
    head = start_head(tiny_tokenizer_dir, net, rpc)
    engines = [start_engine(tiny_tokenizer_dir, net, rpc, rank) for rank in (0, 1)]
    try:
        wait_ready(head, 200)
        assert head.proc is not None
        head.proc.send_signal(signal.SIGKILL)
        exits = wait_exits(engines, HEAD_TIMEOUT_S + 20)
        print("engine exits after the head was killed:", [f"{c} in {s:.2f} s" for c, s in exits])
        for code, _seconds in exits:
            assert code not in (None, 0)
        for engine in engines:
            assert "is gone" in engine.log_text()
    finally:
        stop_all(*engines, head)


def test_mismatching_engine_is_refused_with_a_reason_on_both_sides(
    tiny_tokenizer_dir: Path, net: Network
) -> None:
    rpc = free_ports(net.head.ip, 3)
    head = start_head(tiny_tokenizer_dir, net, rpc, "--deployment-revision", "blue", size=1)
    engine = None
    try:
        engine = start_engine(
            tiny_tokenizer_dir, net, rpc, 0, "--deployment-revision", "green", size=1, wait=False
        )
        code, _ = wait_exit(engine, 30)
        assert code not in (None, 0)
        for log in (head.log_text(), engine.log_text()):
            assert "refused" in log and "revision" in log and "green" in log, log
        wait_ready(head, 503)
    finally:
        stop_all(engine, head)


def test_curve_keys_admit_the_keyed_engine_and_no_other(
    tiny_tokenizer_dir: Path, net: Network, tmp_path: Path
) -> None:
    keys, other = tmp_path / "keys", tmp_path / "other"
    for directory in (keys, other):
        subprocess.run([str(KUBELLM), "zmq-keys", str(directory)], check=True, capture_output=True)
    rpc = free_ports(net.head.ip, 3)
    head = start_head(tiny_tokenizer_dir, net, rpc, "--zmq-curve-dir", str(keys), size=1)
    stranger = keyed = None
    try:
        stranger = start_engine(
            tiny_tokenizer_dir,
            net,
            rpc,
            0,
            "--zmq-curve-dir",
            str(other),
            "--registration-timeout-s",
            "3",
            size=1,
            wait=False,
        )
        code, _ = wait_exit(stranger, 30)
        assert code not in (None, 0)
        assert "accepted" in stranger.log_text()
        keyed = start_engine(tiny_tokenizer_dir, net, rpc, 0, "--zmq-curve-dir", str(keys), size=1)
        wait_ready(head, 200)
        assert complete(head, 5) == 5
    finally:
        stop_all(keyed, stranger, head)
