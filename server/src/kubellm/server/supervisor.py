"""The multi and headless shapes of `kubellm serve` (docs/design/0003-scale-out.md).

Multi (`--api-server-count N`, N > 1), `run_multi`: validate; bind the HTTP socket once
(inheritable) before anything else; the address plan; the coordinator; the local engines
(ranks 0..local-1); then N `kubellm-api-server` children, each a fresh interpreter running the
normal API server phases on the inherited socket with its own engine client (client i of the
plan). The supervisor exits 1 as soon as a child or a local engine dies; on SIGTERM/SIGINT it
forwards SIGTERM to the API servers (they drain for --shutdown-timeout), waits for them, then
stops the engines and the coordinator and exits 0. The API servers share one /metrics view
through a private (0700) directory in their PROMETHEUS_MULTIPROC_DIR (`kubellm.server.metrics`),
which the supervisor removes when it exits; it sets the variable only in the children's
environment, so its own imports of prometheus_client never depend on it.

Headless (`--headless`), `run_headless`: the local engines (ranks start..start+local-1) dial
the head at --data-parallel-address:--data-parallel-rpc-port and report to this process's
monitor (`kubellm.server.monitor`), which serves /health, /ping, /ready and /metrics on
--host:--port. Any engine exit ends the supervisor (1 when the engine failed). SIGTERM makes
/ready 503 and is forwarded to the engines, which drain for up to --shutdown-timeout (they
finish their requests; the API servers send them no new ones); the probes are served until
every engine exited (SIGKILL after the timeout plus a margin), then the supervisor exits 0. A
second SIGTERM is forwarded too and ends the drains at once.

`kubellm-api-server --config-json JSON` (or `--config-json -` to read it from stdin, which the
supervisor uses so that API keys do not show in the process list) is `api_server_main`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from types import FrameType
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kubellm.engine.parent import set_parent_death_signal
from kubellm.protocol.settings import ServeSettings
from kubellm.server import launcher
from kubellm.server.errors import EngineStartupError
from kubellm.server.launcher import EXIT_FAILURE, EXIT_OK, StartupError

if TYPE_CHECKING:
    from kubellm.server.coordinator import Coordinator
    from kubellm.server.head import HeadPlan
    from kubellm.server.local_engines import LocalEngines
    from kubellm.server.monitor import EngineMonitor

logger = logging.getLogger(__name__)

WATCH_INTERVAL_S = 0.1
"""How often the supervisors look at their children."""
PARENT_CHECK_S = 0.5
"""How often an API server checks that its supervisor is still there."""
CHILD_STOP_MARGIN_S = 15.0
"""On shutdown, how long past --shutdown-timeout the API servers get before SIGKILL."""


class ApiServerConfig(BaseModel):
    """What the multi shape's supervisor tells each `kubellm-api-server` child (JSON)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    settings: ServeSettings
    """The settings of `kubellm serve`."""
    client_index: int = Field(ge=0, lt=64)
    """This API server's index: its engine links are client_index of the head's plan."""
    client_input: str
    """ZMQ address this API server binds its ROUTER on (the plan's clients_bind[i].input)."""
    client_output: str
    """ZMQ address this API server binds its PULL on (the plan's clients_bind[i].output)."""
    listen_fd: int = Field(ge=0)
    """The inherited, bound HTTP socket's file descriptor."""
    supervisor_pid: int = Field(gt=0)
    """The supervisor; the API server drains and exits when it is gone."""


# ------------------------------------------------------------------------------ multi shape


def api_server_command() -> list[str]:
    """The `kubellm-api-server` command."""
    from kubellm.server.local_engines import console_script

    return console_script("kubellm-api-server", "kubellm.server.supervisor")


class _StopFlag:
    """SIGTERM/SIGINT set an event that the supervisor's watch loop waits on."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signal_name = ""

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if not self.event.is_set():
            self.signal_name = signal.Signals(signum).name
        self.event.set()


def run_multi(settings: ServeSettings) -> int:
    """Run the multi shape until it is stopped; returns the process exit code."""
    supervisor = MultiSupervisor(settings)
    stop = _StopFlag()
    stop.install()
    try:
        supervisor.start(stop.event)
        code = supervisor.watch(stop)
    except EngineStartupError as e:
        logger.error("the engine failed to start: %s", e)
        code = EXIT_FAILURE
    except StartupError as e:
        logger.error("cannot start: %s", e)
        code = EXIT_FAILURE
    except Exception:
        logger.exception("kubellm serve failed")
        code = EXIT_FAILURE
    finally:
        supervisor.shutdown()
    logger.info("supervisor stopped; exit code %d", code)
    return code


class MultiSupervisor:
    """The multi shape's supervisor: the resources it owns, in start-up order."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.sock: socket.socket | None = None
        self.plan: HeadPlan | None = None
        self.coordinator: Coordinator | None = None
        self.engines: LocalEngines | None = None
        self.children: list[subprocess.Popen[bytes]] = []
        self.metrics_dir: str | None = None

    def start(self, stop: threading.Event) -> None:
        """Validate, bind, plan, coordinator, local engines, API servers (each step skipped
        once a signal arrived; `shutdown` undoes what was done)."""
        from kubellm.engine.transport import engine_compat
        from kubellm.server.coordinator import Coordinator
        from kubellm.server.head import HeadPlan
        from kubellm.server.local_engines import LocalEngines

        settings, parallel = self.settings, self.settings.parallel
        launcher.validate(settings)
        self.sock = launcher.bind_socket(settings.frontend)
        os.set_inheritable(self.sock.fileno(), True)
        launcher.raise_nofile_limit()
        try:
            compat = engine_compat(settings.engine, parallel.deployment_revision)
            self.plan = HeadPlan.create(parallel)
            self.coordinator = Coordinator(
                self.plan,
                compat,
                data_parallel_size=parallel.data_parallel_size,
                heartbeat_interval_s=settings.engine.heartbeat_interval_s,
                engine_timeout_s=settings.frontend.engine_heartbeat_timeout_s,
                curve_dir=parallel.zmq_curve_dir,
            )
            self.coordinator.start()
        except ValueError as e:
            raise StartupError(str(e)) from None
        if stop.is_set():
            return
        self.engines = LocalEngines(
            settings, self.plan.coordinator_connect, range(parallel.local_engines)
        )
        self.engines.start()
        if stop.is_set():
            return
        self.metrics_dir = tempfile.mkdtemp(prefix="kubellm-metrics-")  # mode 0700
        logger.info("API server metrics in %s", self.metrics_dir)
        for index in range(parallel.api_servers):
            if stop.is_set():
                return
            self.children.append(self._spawn(index))

    def _spawn(self, index: int) -> subprocess.Popen[bytes]:
        if self.plan is None or self.sock is None or self.metrics_dir is None:
            raise RuntimeError("the supervisor is not started")
        address = self.plan.clients_bind[index]
        config = ApiServerConfig(
            settings=self.settings,
            client_index=index,
            client_input=address.input,
            client_output=address.output,
            listen_fd=self.sock.fileno(),
            supervisor_pid=os.getpid(),
        )
        proc = subprocess.Popen(
            [*api_server_command(), "--config-json", "-"],
            stdin=subprocess.PIPE,
            pass_fds=[self.sock.fileno()],
            env=api_server_environment(self.metrics_dir),
        )
        if proc.stdin is not None:  # a child that died at once is reported by `watch`
            with contextlib.suppress(BrokenPipeError), proc.stdin:
                proc.stdin.write(config.model_dump_json().encode())
        logger.info("started API server %d: pid %d", index, proc.pid)
        return proc

    def watch(self, stop: _StopFlag) -> int:
        """Until a signal (0) or the death of an API server or a local engine (1)."""
        while not stop.event.wait(WATCH_INTERVAL_S):
            for index, proc in enumerate(self.children):
                code = proc.poll()
                if code is not None:
                    self._forget_metrics_of(proc.pid)
                    logger.error(
                        "API server %d (pid %d) exited with code %d; stopping",
                        index,
                        proc.pid,
                        code,
                    )
                    return EXIT_FAILURE
            exited = self.engines.exited() if self.engines is not None else {}
            for rank, code in sorted(exited.items()):
                logger.error("engine %d exited with code %d; stopping", rank, code)
                return EXIT_FAILURE
        logger.info(
            "%s: stopping %d API server(s) (they drain for up to %.1f s)",
            stop.signal_name or "signal",
            len(self.children),
            self.settings.frontend.shutdown_timeout,
        )
        return EXIT_OK

    def shutdown(self) -> None:
        """API servers first (they drain), then the engines, the coordinator, the plan's files
        and the socket. Idempotent."""
        stop_children(self.children, self.settings.frontend.shutdown_timeout + CHILD_STOP_MARGIN_S)
        self.children = []
        if self.metrics_dir is not None:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
            self.metrics_dir = None
        if self.engines is not None:
            self.engines.stop()
            self.engines = None
        if self.coordinator is not None:
            self.coordinator.stop()
            self.coordinator = None
        if self.plan is not None:
            self.plan.cleanup()
            self.plan = None
        if self.sock is not None:
            launcher.close_socket(self.sock, self.settings.frontend.uds)
            self.sock = None

    def _forget_metrics_of(self, pid: int) -> None:
        """A dead API server's engine gauges leave the shared view (its counts stay)."""
        from kubellm.server.metrics import mark_process_dead

        if self.metrics_dir is not None:
            mark_process_dead(self.metrics_dir, pid)


def api_server_environment(metrics_dir: str) -> dict[str, str]:
    """The API servers' environment: this one, with PROMETHEUS_MULTIPROC_DIR = `metrics_dir`
    (prometheus_client reads it at import, so it is there from the start)."""
    from kubellm.server.metrics import MULTIPROC_ENV

    env = {k: v for k, v in os.environ.items() if k.upper() != MULTIPROC_ENV}
    env[MULTIPROC_ENV] = metrics_dir
    return env


def stop_children(children: Sequence[subprocess.Popen[bytes]], timeout: float) -> None:
    """SIGTERM the running children, wait up to `timeout` s in all, SIGKILL the rest."""
    for proc in children:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in children:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.warning("API server pid %d did not stop in time; killing it", proc.pid)
            proc.kill()
            proc.wait()
        if proc.returncode not in (0, None):
            logger.info("API server pid %d exited with code %d", proc.pid, proc.returncode)


# ----------------------------------------------------------------------- the API server child


def api_server_main(argv: Sequence[str] | None = None) -> int:
    """`kubellm-api-server --config-json JSON|-`: one API server of the multi shape."""
    parser = argparse.ArgumentParser(
        prog="kubellm-api-server",
        description="One API server of `kubellm serve --api-server-count N` (started by its "
        "supervisor, not by hand).",
    )
    parser.add_argument(
        "--config-json",
        required=True,
        metavar="JSON",
        help="The ApiServerConfig as JSON, or - to read it from stdin.",
    )
    args = parser.parse_args(argv)
    raw = sys.stdin.read() if args.config_json == "-" else args.config_json
    try:
        config = ApiServerConfig.model_validate_json(raw)
    except ValidationError as e:  # described without echoing the input (it holds API keys)
        problems = (
            f"{'.'.join(map(str, err['loc'])) or 'config'}: {err['msg']}"
            for err in e.errors(include_input=False, include_url=False)
        )
        parser.error("invalid --config-json: " + "; ".join(problems))
    from kubellm.protocol.logs import configure_logging

    configure_logging(config.settings.frontend.log_format)
    set_parent_death_signal()
    if os.getppid() != config.supervisor_pid:
        logger.error("the supervisor (pid %d) is already gone; exiting", config.supervisor_pid)
        return EXIT_FAILURE
    return launcher.run_phases(serve_api_server(config))


async def serve_api_server(config: ApiServerConfig) -> int:
    """The API server phases on the inherited socket, with this process's engine client."""
    from kubellm.engine.transport import engine_compat
    from kubellm.protocol.messages import ClientAddress
    from kubellm.server.engine_client import EngineClient
    from kubellm.server.metrics import PrometheusMetrics

    settings, parallel = config.settings, config.settings.parallel
    sock = socket.socket(fileno=config.listen_fd)
    watch = asyncio.create_task(watch_parent(config.supervisor_pid))
    try:
        model_dir = launcher.head_model_dir(settings)
        try:
            compat = engine_compat(settings.engine, parallel.deployment_revision)
        except ValueError as e:
            raise StartupError(str(e)) from None
        metrics = PrometheusMetrics(
            launcher.served_model_names(settings, str(model_dir))[0],
            max_model_len=settings.engine.max_model_len,
            engine_totals=config.client_index == 0,  # every API server hears every engine
        )
        address = ClientAddress(input=config.client_input, output=config.client_output)
        engine = EngineClient(
            settings, metrics, address=address, compat=compat, client_index=config.client_index
        )
        async with engine:
            if not parallel.remote_engines:  # R1: listen only once the engines are ready
                await engine.wait_for_engines(
                    range(parallel.local_engines), settings.frontend.engine_ready_timeout_s
                )
            return await launcher.serve_api(settings, engine, metrics, sock, model_dir)
    finally:
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch
        sock.close()  # the supervisor owns the address (and unlinks a --uds path)


async def watch_parent(supervisor_pid: int) -> None:
    """Drain and exit (through SIGTERM) once the supervisor is gone: the fallback of the
    parent-death signal."""
    while os.getppid() == supervisor_pid:
        await asyncio.sleep(PARENT_CHECK_S)
    logger.error("the supervisor (pid %d) is gone; stopping", supervisor_pid)
    os.kill(os.getpid(), signal.SIGTERM)


# --------------------------------------------------------------------------- headless shape


def run_headless(settings: ServeSettings) -> int:
    """Run the headless shape until it is stopped; returns the process exit code."""
    return launcher.run_phases(serve_headless(settings))


async def serve_headless(settings: ServeSettings) -> int:
    """Bind, start the monitor and the engines, serve the probes until an engine exits or a
    signal arrives; stop the engines."""
    from kubellm.engine.transport import tcp_address
    from kubellm.server.local_engines import LocalEngines
    from kubellm.server.monitor import EngineMonitor

    parallel, frontend = settings.parallel, settings.frontend
    ranks = range(
        parallel.data_parallel_start_rank,
        parallel.data_parallel_start_rank + parallel.local_engines,
    )
    launcher.validate(settings)
    sock = launcher.bind_socket(frontend)
    tmpdir = tempfile.mkdtemp(prefix="kubellm-monitor-")  # mode 0700
    monitor = EngineMonitor(ranks, frontend.engine_heartbeat_timeout_s)
    engines: LocalEngines | None = None
    try:
        monitor.bind(f"ipc://{tmpdir}/monitor")
        head = tcp_address(parallel.data_parallel_address, parallel.data_parallel_rpc_port)
        engines = LocalEngines(
            settings,
            head,
            ranks,
            monitor_address=f"ipc://{tmpdir}/monitor",
            drain_timeout_s=frontend.shutdown_timeout,
        )
        engines.start()
        logger.info("headless: engines %s registering with the head at %s", list(ranks), head)
        return await serve_monitor(settings, monitor, engines, sock)
    finally:
        if engines is not None:
            engines.stop()
        monitor.close()
        launcher.close_socket(sock, frontend.uds)
        shutil.rmtree(tmpdir, ignore_errors=True)


async def serve_monitor(
    settings: ServeSettings, monitor: EngineMonitor, engines: LocalEngines, sock: socket.socket
) -> int:
    """uvicorn with the monitor app, until SIGTERM/SIGINT (0) or an engine exit."""
    from kubellm.server.monitor import build_monitor_app, cancel_and_wait

    server = launcher.SignalFreeServer(
        launcher.uvicorn_config(build_monitor_app(monitor), settings.frontend)
    )
    loop = asyncio.get_running_loop()

    def on_signal(sig: int) -> None:
        drain = engines.drain_timeout_s
        how = f"they drain for up to {drain:g} s" if drain > 0 and not monitor.stopping else "now"
        logger.info("%s: stopping the engines (%s)", signal.Signals(sig).name, how)
        monitor.stopping = True
        engines.terminate()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    reader = asyncio.create_task(monitor.run(), name="engine-monitor")
    watcher = asyncio.create_task(watch_engines(server, monitor, engines))
    logger.info("serving engine probes on %s", launcher.describe_address(sock))
    try:
        await server.serve(sockets=[sock])
    finally:
        await cancel_and_wait(reader)
        if not watcher.done():
            await cancel_and_wait(watcher)
    if watcher.done() and not watcher.cancelled() and watcher.exception() is None:
        return watcher.result()
    return EXIT_OK


async def watch_engines(
    server: launcher.SignalFreeServer, monitor: EngineMonitor, engines: LocalEngines
) -> int:
    """Stop the server when an engine exits, or once they all did (or their stop deadline
    passed) after a signal; the exit code the supervisor then returns."""
    while True:
        await asyncio.sleep(WATCH_INTERVAL_S)
        exited = engines.exited()
        deadline = engines.stop_deadline
        if deadline is not None:  # a signal: wait for every engine (they drain)
            if len(exited) < len(engines.ranks) and time.monotonic() < deadline:
                continue
        elif not exited:
            continue
        await asyncio.sleep(WATCH_INTERVAL_S)  # let the monitor read the engine's last status
        failed = False
        for rank, code in sorted(exited.items()):
            detail = monitor.last_detail(rank)
            log = logger.error if code != 0 else logger.info if deadline else logger.warning
            log(
                "engine %d exited with code %d%s; stopping",
                rank,
                code,
                f": {detail}" if detail else "",
            )
            failed = failed or code != 0
        monitor.stopping = True
        server.should_exit = True
        return EXIT_FAILURE if failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(api_server_main())
