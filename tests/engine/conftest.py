"""Shared fixtures of the engine tests: one torch thread, and tiny random checkpoints.

Without CUDA, the Triton kernel tests (test_kernels.py) run the kernels on CPU tensors through
Triton's interpreter. Triton reads TRITON_INTERPRET when it is first imported (its library
functions are wrapped then), and transformers' model modules import triton, so it is set here,
before any engine test module is collected.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import tiny_checkpoints as tc  # type: ignore[import-not-found, unused-ignore]
import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One saved checkpoint per kind in `tiny_checkpoints.KINDS`, made once per session."""
    base = tmp_path_factory.mktemp("tiny_ckpt")
    return {kind: tc.cached_checkpoint(kind, base) for kind in tc.KINDS}
