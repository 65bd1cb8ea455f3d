"""e2e fixtures: the same `k8s_cluster` as tests/k8s (one cluster per session), plus the test
reports on each item so that fixtures can dump the cluster loudly when a test failed."""

from __future__ import annotations

import sys
from collections.abc import Generator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "k8s"))

from cluster import (  # type: ignore[import-not-found, unused-ignore]
    k8s_cluster,
    pytest_collection_finish,
    pytest_terminal_summary,
)

__all__ = ["k8s_cluster", "pytest_collection_finish", "pytest_terminal_summary"]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep each phase's report as `item.rep_setup` / `rep_call` (read by failure dumps)."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
