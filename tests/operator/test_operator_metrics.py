"""The operator's own metrics: reconciliations counted by result and served on --metrics-port."""

from __future__ import annotations

import pytest

from kubellm.operator import metrics


def _count(result: str) -> float:
    return metrics.RECONCILES.labels(result)._value.get()


class _Permanent(Exception):
    pass


def test_reconciliations_are_counted_by_result() -> None:
    before = {r: _count(r) for r in ("ok", "error", "permanent")}
    with metrics.reconciling(lambda e: isinstance(e, _Permanent)):
        pass
    for exc in (_Permanent("bad spec"), RuntimeError("API down")):
        with pytest.raises(type(exc)), metrics.reconciling(lambda e: isinstance(e, _Permanent)):
            raise exc
    assert {r: _count(r) - before[r] for r in before} == {"ok": 1, "error": 1, "permanent": 1}


def test_cli_refuses_a_port_out_of_range() -> None:
    from kubellm.operator import cli

    with pytest.raises(SystemExit) as exited:
        cli.main(["run", "--all-namespaces", "--metrics-port", "70000"])
    assert exited.value.code == 2
