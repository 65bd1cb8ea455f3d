"""bench/gpu_serve.py: its synthetic tokenizer covers the model's whole vocabulary, and a
`--device cpu --tiny` run serves the workload end to end, so the GPU script does not rot.

bench/ is not a package: the script is loaded as a module with bench/ on sys.path (it imports
gpu_bench and frontend_scaleout from there), and run as a subprocess as the lead runs it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
SCRIPT = BENCH / "gpu_serve.py"
THROUGHPUT_KEYS = {
    "tokens_per_s",
    "requests_per_s",
    "ttft_median_ms",
    "ttft_p99_ms",
    "itl_mean_ms",
    "itl_median_ms",
    "itl_p99_ms",
    "api_server_cpu_us_per_token",
    "output_tokens",
    "seconds",
}
LATENCY_KEYS = {"ttft_ms", "itl_mean_ms", "itl_p50_ms", "itl_p99_ms", "output_tokens"}


def _load(name: str) -> ModuleType:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gs() -> ModuleType:
    return _load("gpu_serve")


def test_tokenizer_covers_the_issue_models_vocab(gs: ModuleType, tmp_path: Path) -> None:
    from kubellm.server.tokenizer import Tokenizer

    cfg = dict(gs.gb.QWEN3_0_6B)
    gs.write_tokenizer(tmp_path, cfg)
    tok = Tokenizer.from_dir(tmp_path)
    vocab = cfg["vocab_size"]
    assert tok.vocab_size == vocab
    assert tok.bos_token_id == cfg["bos_token_id"] and tok.eos_token_id == cfg["eos_token_id"]
    assert tok.pad_token_id == cfg["pad_token_id"]
    assert set(tok.all_special_ids) == {cfg["bos_token_id"], cfg["eos_token_id"]}
    hf = tok._tok
    names = [hf.id_to_token(i) for i in range(vocab)]
    assert all(names), "an id has no token"
    assert len(set(names)) == vocab
    texts = hf.decode_batch([[i] for i in range(vocab)], skip_special_tokens=False)
    assert all(texts), "an id decodes to nothing"
    rng = random.Random(7)
    for tid in (rng.randrange(vocab) for _ in range(500)):
        assert tok.token_bytes(tid), tid
        assert tok.decode([tid], skip_special_tokens=False), tid
    text = "The river ran 42 miles, past Zürich & \u65e5\u672c!"
    assert tok.decode(tok.encode(text)) == text


def test_tokenizer_fits_the_tiny_vocab_with_specials_among_the_bytes(
    gs: ModuleType, tmp_path: Path
) -> None:
    from kubellm.server.tokenizer import Tokenizer

    cfg = {**gs.gb.QWEN3_0_6B, **gs.gb.TINY_OVERRIDES}
    gs.write_tokenizer(tmp_path, cfg)
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.vocab_size == cfg["vocab_size"] == 512
    assert (tok.bos_token_id, tok.eos_token_id) == (cfg["bos_token_id"], cfg["eos_token_id"])
    assert tok.decode(tok.encode("hello there")) == "hello there"
    assert all(tok.token_bytes(i) for i in range(512))


@pytest.mark.parametrize(
    ("override", "message"),
    [({"vocab_size": 200}, "no room"), ({"eos_token_id": 600}, "outside the vocabulary")],
)
def test_tokenizer_rejects_configs_it_cannot_fill(
    gs: ModuleType, override: dict[str, int], message: str
) -> None:
    cfg = {**gs.gb.QWEN3_0_6B, **gs.gb.TINY_OVERRIDES, **override}
    with pytest.raises(ValueError, match=message):
        gs.build_tokenizer(cfg)


def test_trace_fields_pool_each_streams_gaps(gs: ModuleType) -> None:
    trace = _load("frontend_scaleout").StreamTrace
    traces = [
        trace(True, 10.0, [10.5, 10.6, 10.8], 3, 5, "", 10.9),
        trace(True, 10.0, [11.0, 11.4], 3, 7, "", 11.5),
        trace(True, 10.0, [10.2], 2, 4, "", 10.3),  # short: not complete
        trace(False, 10.0, [], 0, 0, "HTTP 500: b'x'"),
    ]
    fields = gs.trace_fields(traces, 3)
    assert fields["num_requests"] == 4 and fields["complete"] == 2 and fields["failed"] == 1
    assert fields["all_lengths_exact"] is False
    assert fields["errors"] == ["HTTP 500: b'x'"]
    assert fields["output_tokens"] == 8 and fields["prompt_tokens"] == 16
    assert fields["content_chunks"] == 6
    gaps = [0.1, 0.2, 0.4]  # within each stream only: never across streams
    assert fields["itl_mean_ms"] == pytest.approx(1e3 * sum(gaps) / 3, abs=1e-3)
    assert fields["itl_median_ms"] == pytest.approx(200.0, abs=1e-3)
    assert fields["itl_p99_ms"] == pytest.approx(400.0, abs=1e-3)
    assert fields["ttft_median_ms"] == pytest.approx(500.0, abs=1e-3)


def test_serve_command_carries_the_offline_engine_settings(gs: ModuleType) -> None:
    args = gs.parse_args(["--api-server-count", "1,2", "--serve-arg=--seed", "--serve-arg=3"])
    assert args.api_server_count == [1, 2]
    plan = gs.ServePlan.for_args(args)
    assert (plan.num_requests, plan.output_len, plan.concurrency) == (256, 512, 256)
    command = gs.serve_command(args, plan, Path("/m"), 8001, 2)
    flags = {name: command[command.index(name) + 1] for name in command if name[:2] == "--"}
    assert command[1:5] == ["-m", "kubellm.server.cli", "serve", "/m"]
    assert flags["--max-num-seqs"] == "256"
    assert flags["--max-num-batched-tokens"] == "16384"
    assert flags["--max-model-len"] == "1536"
    assert flags["--dtype"] == "bfloat16" and flags["--device"] == "cuda"
    assert flags["--api-server-count"] == "2"
    assert command[-2:] == ["--seed", "3"]  # after ours: the last value wins
    with pytest.raises(SystemExit):
        gs.parse_args(["--api-server-count", "0"])


def _run(tmp_path: Path, *flags: str) -> tuple[int, list[dict[str, Any]], str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, str(SCRIPT), "--device", "cpu", "--tiny"]
    command += ["--workdir", str(tmp_path), *flags]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240, cwd=ROOT)
    records = []
    for line in proc.stdout.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            pytest.fail(f"stdout line is not JSON: {line!r}\nstderr:\n{proc.stderr[-3000:]}")
    return proc.returncode, records, proc.stderr


def _leftovers(tmp_path: Path) -> list[str]:
    """Processes still running whose command line names the run's model directory."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        command = " ".join(p.info["cmdline"] or [])
        if str(tmp_path) in command and p.pid != os.getpid():
            found.append(command)
    return found


@pytest.mark.slow
@pytest.mark.integration
def test_tiny_cpu_run_serves_every_request(tmp_path: Path) -> None:
    rc, records, stderr = _run(tmp_path, "--offline-tokens-per-s", "1000")
    assert rc == 0, stderr[-3000:]
    by_name = {r["name"]: r for r in records}
    assert len(by_name) == len(records), "duplicate line names"
    assert list(by_name) == [
        "workload",
        "serve.api1.throughput",
        "serve.api1.latency",
        "serve.api1.ttft",
        "serve.api1.vs_offline",
    ]
    assert all(r["versions"]["torch"] and "error" not in r for r in records)
    work, tput = by_name["workload"], by_name["serve.api1.throughput"]
    assert tput.keys() >= THROUGHPUT_KEYS
    assert tput["complete"] == tput["num_requests"] == work["num_requests"] == 8
    assert tput["all_lengths_exact"] is True and tput["failed"] == 0
    assert tput["output_tokens"] == work["num_requests"] * work["output_len"]
    assert tput["prompt_tokens"] == work["prompt_tokens"]  # token-id prompts, sent as they are
    assert tput["tokens_per_s"] > 0 and tput["api_server_cpu_us_per_token"] > 0
    assert tput["itl_p99_ms"] >= tput["itl_median_ms"] >= 0
    latency = by_name["serve.api1.latency"]
    assert latency.keys() >= LATENCY_KEYS and latency["all_lengths_exact"] is True
    vs = by_name["serve.api1.vs_offline"]
    assert vs["offline_tokens_per_s"] == 1000
    assert vs["ratio"] == pytest.approx(vs["online_tokens_per_s"] / 1000, rel=1e-3)
    assert not _leftovers(tmp_path)


def test_offline_number_comes_from_gpu_bench_output(gs: ModuleType, tmp_path: Path) -> None:
    lines = [
        {"name": "workload", "num_requests": 256},
        {"name": "kubellm.triton.throughput", "tokens_per_s": 9.0, "aborted": True},
        {"name": "kubellm.triton.latency", "tokens_per_s": 250.0},
        {"name": "kubellm.torch.throughput", "tokens_per_s": 5220.5, "aborted": False},
    ]
    path = tmp_path / "gpu_bench.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    assert gs.parse_args(["--offline-from", str(path)]).offline_tokens_per_s == 5220.5
    path.write_text(json.dumps(lines[0]) + "\n")  # gpu_bench failed: serve still runs
    assert gs.parse_args(["--offline-from", str(path)]).offline_tokens_per_s is None
    with pytest.raises(ValueError, match="no complete"):
        gs.offline_tokens_per_s(path)


@pytest.mark.slow
@pytest.mark.integration
def test_a_server_that_is_not_ready_in_time_is_reported_and_stopped(tmp_path: Path) -> None:
    rc, records, stderr = _run(tmp_path, "--ready-timeout-s", "2")
    assert rc == 1, stderr[-3000:]
    assert [r["name"] for r in records] == ["workload", "serve.api1"]
    assert "did not become ready" in records[1]["error"]
    assert not _leftovers(tmp_path)
