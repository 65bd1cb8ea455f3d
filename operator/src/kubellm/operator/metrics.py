"""The operator's own Prometheus metrics (`kubellm-operator run --metrics-port PORT`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from prometheus_client import Counter, Histogram, start_http_server

RECONCILES = Counter(
    "kubellm_operator_reconciles",
    "LLMServer reconciliations by result (ok, permanent: a spec problem, error: retried).",
    ["result"],
)
RECONCILE_SECONDS = Histogram(
    "kubellm_operator_reconcile_seconds", "Time spent in one LLMServer reconciliation."
)
STATUS_REFRESHES = Counter(
    "kubellm_operator_status_refreshes", "Status refreshes triggered by child changes."
)


@contextmanager
def reconciling(is_permanent: Callable[[BaseException], bool]) -> Iterator[None]:
    """Count and time one reconciliation; `is_permanent(e)` tells a spec problem from an error."""
    started = time.perf_counter()
    try:
        yield
    except BaseException as e:
        RECONCILES.labels("permanent" if is_permanent(e) else "error").inc()
        raise
    else:
        RECONCILES.labels("ok").inc()
    finally:
        RECONCILE_SECONDS.observe(time.perf_counter() - started)


def serve(port: int) -> None:
    """Serve /metrics on every interface at `port` (a daemon thread)."""
    start_http_server(port)
