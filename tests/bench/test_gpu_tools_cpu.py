"""The CUDA-only bench tools say so on a machine without CUDA (one JSON line, exit 0), and the
prefill kernel bench runs end to end on CPU under Triton's interpreter, so none of them rots."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CUDA_ONLY = ["decode_kernel_bench.py", "skinny_linear_bench.py", "step_profile.py"]


def _run(script: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    pythonpath = os.pathsep.join([str(ROOT / "bench"), os.environ.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "PYTHONPATH": pythonpath, "CUDA_VISIBLE_DEVICES": "", **env},
        check=False,
    )


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("script", CUDA_ONLY)
def test_cuda_only_tools_print_a_skip_line_without_cuda(script: str) -> None:
    proc = _run(script)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(lines) == 1 and lines[0]["skipped"] is True and lines[0]["reason"] == "no CUDA"


@pytest.mark.slow
@pytest.mark.integration
def test_prefill_kernel_bench_runs_on_cpu_in_the_interpreter() -> None:
    proc = _run(
        "prefill_kernel_bench.py",
        "--device", "cpu", "--dtype", "float32", "--tokens", "48", "--max-len", "24",
        "--head-dim", "16", "--iters", "1", "--rounds", "1",
        TRITON_INTERPRET="1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    kernel = [line for line in lines if line["impl"] == "triton"]
    assert {line["case"] for line in kernel} == {"fresh", "prefix"}
    assert all(line["max_abs_err_vs_torch"] < 1e-4 for line in kernel)
