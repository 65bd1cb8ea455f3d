"""Shared fixtures of the engine tests: one torch thread, and tiny random checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import tiny_checkpoints as tc  # type: ignore[import-not-found, unused-ignore]
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One saved checkpoint per kind in `tiny_checkpoints.KINDS`, made once per session."""
    base = tmp_path_factory.mktemp("tiny_ckpt")
    return {kind: tc.cached_checkpoint(kind, base) for kind in tc.KINDS}
