"""bench/gpu_bench.py on CPU: `--device cpu --tiny` runs every case, so the GPU script does not rot.

The script is run as the lead runs it on the device (a subprocess; stdout must hold JSON lines
only). Its pure helpers are also loaded as a module (bench/ is not a package) and unit-tested.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_bench.py"
COMMON_KEYS = {"name", "device", "versions"}
VERSION_KEYS = {"torch", "triton", "transformers", "kubellm"}
MEASURED_KEYS = {"output_tokens", "seconds", "tokens_per_s"}


def _load_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_bench"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def _run(*flags: str, timeout: float = 120) -> tuple[int, list[dict[str, Any]], str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", *flags],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=ROOT,
    )
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            pytest.fail(f"stdout line is not JSON: {line!r}\nstderr:\n{proc.stderr[-3000:]}")
    return proc.returncode, records, proc.stderr


def _check_common(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    by_name = {}
    for rec in records:
        assert rec.keys() >= COMMON_KEYS, rec
        assert rec["versions"].keys() >= VERSION_KEYS, rec
        assert rec["versions"]["torch"], rec
        assert rec["name"] not in by_name, f"duplicate line {rec['name']}"
        by_name[rec["name"]] = rec
        assert "error" not in rec, rec
        if rec.keys() >= MEASURED_KEYS:
            assert rec["output_tokens"] > 0, rec
            assert rec["seconds"] > 0, rec
            assert rec["tokens_per_s"] > 0, rec
    return by_name


def _check_engine_lines(by_name: dict[str, dict[str, Any]], prefix: str) -> None:
    work = by_name["workload"]
    tput = by_name[f"{prefix}.throughput"]
    assert tput["output_tokens"] == work["num_requests"] * work["output_len"]
    assert tput["all_lengths_exact"] is True
    assert tput["aborted"] is False
    assert tput["settings"]["max_num_seqs"] >= work["num_requests"]
    latency = by_name[f"{prefix}.latency"]
    assert latency["itl_mean_ms"] > 0 and latency["itl_p99_ms"] >= latency["itl_p50_ms"] > 0
    assert latency["ttft_ms"] > 0
    assert by_name[f"{prefix}.ttft"]["ttft_mean_ms"] > 0
    profile = by_name[f"{prefix}.decode_profile"]
    assert profile["step_ms"] > 0
    assert profile["gpu_busy_share"] is None  # no CUDA here: said so rather than made up
    assert profile["reason"]


@pytest.mark.slow
@pytest.mark.integration
def test_tiny_cpu_run_without_transformers() -> None:
    rc, records, stderr = _run("--skip-transformers")
    assert rc == 0, stderr[-3000:]
    by_name = _check_common(records)
    _check_engine_lines(by_name, "kubellm.torch")
    assert by_name["kubellm.torch.correctness"]["skipped"] is True
    assert not any(name.startswith(("transformers.", "speedup.")) for name in by_name)


@pytest.mark.slow
@pytest.mark.integration
def test_tiny_cpu_run_with_transformers_gate_and_speedups() -> None:
    rc, records, stderr = _run(timeout=180)
    assert rc == 0, stderr[-3000:]
    by_name = _check_common(records)
    _check_engine_lines(by_name, "kubellm.torch")
    gate = by_name["kubellm.torch.correctness"]
    assert gate["first_token_ok"] is True
    assert all(0 <= n <= gate["tokens_each"] for n in gate["exact_prefix"])
    assert by_name["transformers.throughput"]["aborted"] is False
    assert by_name["transformers.latency"]["itl_mean_ms"] > 0
    for case in ("throughput", "itl"):
        assert by_name[f"speedup.torch.{case}"]["ratio"] > 0


def test_interval_union_and_trace_busy_time(tmp_path: Path) -> None:
    gb = _load_module()
    assert gb.merge_intervals_us([]) == 0
    assert gb.merge_intervals_us([(0, 10), (5, 12), (20, 25), (21, 22)]) == 17
    trace = {
        "traceEvents": [
            {"ph": "X", "cat": "kernel", "ts": 100, "dur": 10},
            {"ph": "X", "cat": "kernel", "ts": 105, "dur": 10},  # overlaps: counted once
            {"ph": "X", "cat": "gpu_memcpy", "ts": 200, "dur": 4},
            {"ph": "X", "cat": "cuda_runtime", "ts": 0, "dur": 500},  # host side: not GPU time
            {"ph": "i", "cat": "kernel", "ts": 300},
        ]
    }
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(trace))
    assert gb.gpu_busy_us(path) == 19


def test_workload_draw_is_seeded_and_in_range() -> None:
    gb = _load_module()
    a = gb.make_workload(32, (100, 1024), 512, 151936, 0)
    b = gb.make_workload(32, (100, 1024), 512, 151936, 0)
    c = gb.make_workload(32, (100, 1024), 512, 151936, 1)
    assert a.prompts == b.prompts
    assert a.prompts != c.prompts
    assert all(100 <= len(p) <= 1024 for p in a.prompts)
    assert all(0 <= t < 151936 for p in a.prompts for t in p)
    assert a.output_tokens == 32 * 512
    # The issue's draw: lengths come from random.Random(seed).randint, all drawn first.
    import random

    rng = random.Random(0)
    assert [len(p) for p in a.prompts] == [rng.randint(100, 1024) for _ in range(32)]


def test_checkpoint_shapes_match_the_issue_model() -> None:
    gb = _load_module()
    shapes = dict(gb._tensor_shapes(gb.QWEN3_0_6B))
    params = sum((lambda s: s[0] * (s[1] if len(s) > 1 else 1))(shape) for shape in shapes.values())
    assert 0.59e9 < params < 0.61e9  # Qwen3-0.6B with tied embeddings: ~596M parameters
    assert shapes["model.layers.27.self_attn.k_proj.weight"] == (8 * 128, 1024)
    assert "lm_head.weight" not in shapes


class _FakeLM:
    """Stands in for a transformers model: fixed logits for the last positions."""

    def __init__(self, rows: list[list[float]]) -> None:
        import torch

        self.device = torch.device("cpu")
        self.rows = torch.tensor(rows)

    def __call__(self, input_ids: Any, logits_to_keep: int) -> Any:
        assert logits_to_keep == len(self.rows)
        return type("Out", (), {"logits": self.rows[None]})()


def test_gate_counts_exact_and_near_tie_tokens() -> None:
    gb = _load_module()
    rows = [
        [0.0, 5.0, 0.0, 0.0, 0.0],  # ours 1: transformers' own choice
        [0.0, 0.0, 4.9, 0.0, 5.0],  # ours 2: a near-tie, 0.1 below the top
        [5.0, 0.0, 0.0, 0.0, 0.0],  # ours 3: far below the top
    ]
    agree = gb.hf_agreement(_FakeLM(rows), [7, 8], [1, 2, 3], 0.1)
    assert agree["exact_prefix"] == 1
    assert agree["within_tol"] == 2
    assert agree["first_ok"] is True
    strict = gb.hf_agreement(_FakeLM(rows), [7, 8], [1, 2, 3], 0.01)
    assert strict["within_tol"] == 1
    wrong_first = gb.hf_agreement(_FakeLM(rows[::-1]), [7, 8], [1, 2, 3], 0.1)
    assert wrong_first["first_ok"] is False
    assert wrong_first["exact_prefix"] == 0
