"""`HeadPlan`: where a head's engine links listen (docs/design/0003-scale-out.md, "Links").

When every engine runs on this host, all links are `ipc://` sockets in a private `0700` temp
dir and nothing listens on TCP. Otherwise they are TCP on `--data-parallel-address` A: bound on
the IP A resolves to (never a wildcard), port P = `--data-parallel-rpc-port` for the
coordinator and P+1+2i / P+2+2i for API server i's input / output; engines are told the
addresses with A spelled as given, so a DNS name works for them.

`start_head` composes the single shape: the plan, the coordinator, the local engines and the one
API server's `EngineClient`.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kubellm.engine.transport import engine_compat, resolve_bind_host, tcp_address
from kubellm.protocol.messages import ClientAddress
from kubellm.protocol.settings import ParallelSettings, ServeSettings
from kubellm.server.errors import EngineStartupError
from kubellm.server.stats import StatsSink

if TYPE_CHECKING:
    from kubellm.server.engine_client import EngineClient

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeadPlan:
    """The addresses of a head's coordinator and API servers, as bound and as dialled."""

    coordinator_bind: str
    """The coordinator's ROUTER binds this."""
    coordinator_connect: str
    """Engines (local ones too) dial this."""
    clients_bind: tuple[ClientAddress, ...]
    """API server i binds clients_bind[i]."""
    clients_connect: tuple[ClientAddress, ...]
    """What `EngineWelcome.clients` tells engines."""
    tmpdir: str | None
    """The private 0700 dir holding the ipc sockets (None for TCP)."""

    @classmethod
    def create(cls, parallel: ParallelSettings) -> HeadPlan:
        """The plan for these settings: ipc when no engine is remote, TCP otherwise.

        Raises ValueError when the TCP address does not resolve or is not one of this host's.
        """
        count = max(1, parallel.api_servers)
        if parallel.remote_engines:
            plan = _tcp_plan(parallel.data_parallel_address, parallel.data_parallel_rpc_port, count)
        else:
            plan = _ipc_plan(count)
        logger.info(
            "engine links: coordinator %s, %d API server link(s) starting at %s",
            plan.coordinator_bind,
            count,
            plan.clients_bind[0].input,
        )
        return plan

    def cleanup(self) -> None:
        """Remove the ipc temp dir (if any); safe to call more than once."""
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)


def _ipc_plan(count: int) -> HeadPlan:
    tmpdir = tempfile.mkdtemp(prefix="kubellm-head-")  # mode 0700
    clients = tuple(
        ClientAddress(input=f"ipc://{tmpdir}/input-{i}", output=f"ipc://{tmpdir}/output-{i}")
        for i in range(count)
    )
    coordinator = f"ipc://{tmpdir}/coordinator"
    return HeadPlan(coordinator, coordinator, clients, clients, tmpdir)


def _tcp_plan(address: str, port: int, count: int) -> HeadPlan:
    if port + 2 * count > 65535:
        raise ValueError(
            f"--data-parallel-rpc-port {port} leaves no room for {count} API server(s): "
            f"they need ports up to {port + 2 * count}"
        )
    bind_host = resolve_bind_host(address)
    _check_local_address(address, bind_host)

    def clients(host: str) -> tuple[ClientAddress, ...]:
        return tuple(
            ClientAddress(
                input=tcp_address(host, port + 1 + 2 * i),
                output=tcp_address(host, port + 2 + 2 * i),
            )
            for i in range(count)
        )

    return HeadPlan(
        coordinator_bind=tcp_address(bind_host, port),
        coordinator_connect=tcp_address(address, port),
        clients_bind=clients(bind_host),
        clients_connect=clients(address),
        tmpdir=None,
    )


def _check_local_address(address: str, ip: str) -> None:
    """Raise ValueError unless `ip` (what `address` resolved to) is an address of this host,
    checked by binding a throwaway socket on it (port 0)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((ip, 0))
    except OSError as e:
        raise ValueError(
            f"--data-parallel-address {address!r} ({ip}) is not an address of this host: "
            f"cannot bind it ({e.strerror or e})"
        ) from None


@contextlib.asynccontextmanager
async def start_head(settings: ServeSettings, stats: StatsSink) -> AsyncIterator[EngineClient]:
    """The single shape (one API server): plan the links, start the coordinator, this API
    server's client and the local engines, and wait for those engines. Everything is shut
    down in reverse order on exit, also when start-up fails or is interrupted (no orphan
    engine)."""
    from kubellm.server.coordinator import Coordinator
    from kubellm.server.engine_client import EngineClient
    from kubellm.server.local_engines import LocalEngines

    parallel = settings.parallel
    try:
        compat = engine_compat(settings.engine, parallel.deployment_revision)
    except ValueError as e:
        raise EngineStartupError(f"cannot serve this model: {e}") from e
    plan = HeadPlan.create(parallel)
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(plan.cleanup)
        coordinator = Coordinator(
            plan,
            compat,
            data_parallel_size=parallel.data_parallel_size,
            heartbeat_interval_s=settings.engine.heartbeat_interval_s,
            engine_timeout_s=settings.frontend.engine_heartbeat_timeout_s,
            curve_dir=parallel.zmq_curve_dir,
        )
        coordinator.start()
        stack.callback(coordinator.stop)
        local = LocalEngines(settings, plan.coordinator_connect, range(parallel.local_engines))
        client = EngineClient(
            settings,
            stats,
            address=plan.clients_bind[0],
            compat=compat,
            local=local,
            goodbye_reason=coordinator.goodbye_reason,
        )
        stack.push_async_callback(client.shutdown)
        await client.start()  # bound before the engines dial in
        stack.callback(local.stop)  # before the client closes: the engines' goodbyes arrive
        stack.callback(client.expect_engine_exits)
        local.start()
        await client.wait_for_engines(local.ranks, settings.frontend.engine_ready_timeout_s)
        yield client
