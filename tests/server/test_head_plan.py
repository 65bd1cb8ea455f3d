"""HeadPlan: ipc in a private dir when every engine is local, TCP on the head's address else."""

from __future__ import annotations

import os
import socket
import stat

import pytest

from kubellm.protocol.settings import ParallelSettings
from kubellm.server.head import HeadPlan


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def test_ipc_plan_for_local_engines() -> None:
    plan = HeadPlan.create(ParallelSettings(data_parallel_size=2, api_server_count=3))
    try:
        assert plan.tmpdir is not None
        mode = os.stat(plan.tmpdir).st_mode
        assert stat.S_IMODE(mode) == 0o700
        assert plan.coordinator_bind == plan.coordinator_connect
        assert plan.coordinator_bind.startswith(f"ipc://{plan.tmpdir}/")
        assert plan.clients_bind == plan.clients_connect
        assert len(plan.clients_bind) == 3
        addresses = [plan.coordinator_bind] + [
            a for c in plan.clients_bind for a in (c.input, c.output)
        ]
        assert len(set(addresses)) == len(addresses)
        assert all(a.startswith(f"ipc://{plan.tmpdir}/") for a in addresses)
    finally:
        plan.cleanup()
    assert not os.path.exists(plan.tmpdir)
    plan.cleanup()  # idempotent


def test_ipc_plan_has_at_least_one_client() -> None:
    plan = HeadPlan.create(ParallelSettings(headless=True))
    try:
        assert len(plan.clients_bind) == 1
    finally:
        plan.cleanup()


def test_tcp_plan_ports_and_addresses() -> None:
    parallel = ParallelSettings(
        data_parallel_size=4,
        data_parallel_size_local=0,
        api_server_count=2,
        data_parallel_address="localhost",
        data_parallel_rpc_port=31000,
    )
    plan = HeadPlan.create(parallel)
    plan.cleanup()  # nothing to remove
    assert plan.tmpdir is None
    assert plan.coordinator_connect == "tcp://localhost:31000"
    bind_ip = plan.coordinator_bind.removeprefix("tcp://").rsplit(":", 1)[0].strip("[]")
    assert bind_ip in {"127.0.0.1", "::1"}
    assert plan.coordinator_bind.endswith(":31000")
    assert [(c.input, c.output) for c in plan.clients_connect] == [
        ("tcp://localhost:31001", "tcp://localhost:31002"),
        ("tcp://localhost:31003", "tcp://localhost:31004"),
    ]
    for bound, told in zip(plan.clients_bind, plan.clients_connect, strict=True):
        assert bound.input.rsplit(":", 1)[1] == told.input.rsplit(":", 1)[1]
        assert bound.output.rsplit(":", 1)[1] == told.output.rsplit(":", 1)[1]
        assert bind_ip in bound.input


@pytest.mark.skipif(not _ipv6_loopback(), reason="::1 is not available on this host")
def test_tcp_plan_ipv6() -> None:
    parallel = ParallelSettings(
        data_parallel_size=2, data_parallel_size_local=1, data_parallel_address="::1"
    )
    plan = HeadPlan.create(parallel)
    assert plan.coordinator_bind == "tcp://[::1]:29550"
    assert plan.coordinator_connect == "tcp://[::1]:29550"
    assert plan.clients_connect[0].input == "tcp://[::1]:29551"
    assert plan.clients_connect[1].output == "tcp://[::1]:29554"


def test_address_that_does_not_resolve() -> None:
    parallel = ParallelSettings(
        data_parallel_size=2,
        data_parallel_size_local=0,
        data_parallel_address="no-such-host.invalid",
    )
    with pytest.raises(ValueError, match=r"no-such-host\.invalid"):
        HeadPlan.create(parallel)


def test_address_not_of_this_host() -> None:
    parallel = ParallelSettings(
        data_parallel_size=2,
        data_parallel_size_local=0,
        data_parallel_address="192.0.2.1",  # TEST-NET-1, never assigned to a host
    )
    with pytest.raises(ValueError, match=r"192\.0\.2\.1.*not an address of this host"):
        HeadPlan.create(parallel)
