"""`LocalEngines`: spawn and stop this host's `kubellm-engine` processes.

Each engine gets an `EngineCoreConfig` as `--config-json`, runs in its own process group (a
terminal Ctrl-C reaches only the spawning process, which then stops the engines in order) and
registers with the coordinator at `coordinator_address`; the engine's parent-death check
covers a spawner that dies abruptly.

With a `drain_timeout_s` (the headless shape: --shutdown-timeout) the engines drain on SIGTERM
(`kubellm.engine.core`): `terminate` sends it once, and `stop` waits that long plus
`STOP_MARGIN_S` before SIGKILL; a second `terminate` ends their drains at once.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Sequence
from pathlib import Path

from kubellm.engine.transport import EngineCoreConfig
from kubellm.protocol.settings import ServeSettings

logger = logging.getLogger(__name__)

_MAX_RANK = 2**16 - 1
STOP_TIMEOUT_S = 5.0
"""How long `stop` waits for engines that do not drain before SIGKILL."""
STOP_MARGIN_S = 5.0
"""How long past their drain timeout `stop` waits for draining engines before SIGKILL."""


def console_script(name: str, module: str) -> list[str]:
    """Console script `name` of this Python environment, else `python -m module` (an
    environment installed with --target has no scripts next to its interpreter)."""
    for folder in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        candidate = Path(folder) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return [str(candidate)]
    return [sys.executable, "-m", module]


def engine_command() -> list[str]:
    """The `kubellm-engine` command."""
    return console_script("kubellm-engine", "kubellm.engine.cli")


class LocalEngines:
    """The engine processes of `ranks` on this host. `start` and `stop` are meant to be called
    from the main (event-loop) thread; `pids` and `exited` may be called from any thread."""

    def __init__(
        self,
        settings: ServeSettings,
        coordinator_address: str,
        ranks: Sequence[int],
        *,
        monitor_address: str | None = None,
        drain_timeout_s: float = 0.0,
    ):
        self.ranks = tuple(ranks)
        if len(set(self.ranks)) != len(self.ranks):
            raise ValueError(f"engine ranks must be distinct, got {list(self.ranks)}")
        bad = [r for r in self.ranks if not 0 <= r <= _MAX_RANK]
        if bad:
            raise ValueError(f"engine ranks must lie in 0..{_MAX_RANK}, got {bad}")
        self._settings = settings
        self._coordinator_address = coordinator_address
        self._monitor_address = monitor_address
        self.drain_timeout_s = drain_timeout_s
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self._stopped = False
        self._terminated_at: float | None = None
        """time.monotonic() of the first `terminate`."""

    def config(self, rank: int) -> EngineCoreConfig:
        """The `--config-json` of the engine of `rank`."""
        parallel = self._settings.parallel
        return EngineCoreConfig(
            settings=self._settings.engine,
            coordinator_address=self._coordinator_address,
            engine_index=rank,
            parent_pid=os.getpid(),
            revision=parallel.deployment_revision,
            head_timeout_s=parallel.head_timeout_s,
            registration_timeout_s=parallel.registration_timeout_s,
            curve_dir=parallel.zmq_curve_dir,
            monitor_address=self._monitor_address,
            drain_timeout_s=self.drain_timeout_s,
        )

    def start(self) -> None:
        """Spawn one engine process per rank. When one cannot be spawned, the ones already
        started are stopped and the OSError propagates."""
        if self._procs or self._stopped:
            raise RuntimeError("the local engines were already started")
        try:
            for rank in self.ranks:
                self._spawn(rank)
        except BaseException:
            self.stop()
            raise

    def _spawn(self, rank: int) -> None:
        command = [*engine_command(), "--config-json", self.config(rank).model_dump_json()]
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, process_group=0)
        self._procs[rank] = proc
        logger.info(
            "started engine rank %d: pid %d (backend %s), registering at %s",
            rank,
            proc.pid,
            self._settings.engine.engine_backend,
            self._coordinator_address,
        )

    @property
    def pids(self) -> dict[int, int]:
        """rank → pid of every engine started (exited ones included)."""
        return {rank: proc.pid for rank, proc in self._procs.items()}

    def exited(self) -> dict[int, int]:
        """rank → exit code of the engines that have exited (negative: killed by a signal)."""
        codes = {rank: proc.poll() for rank, proc in list(self._procs.items())}
        return {rank: code for rank, code in codes.items() if code is not None}

    @property
    def stop_timeout_s(self) -> float:
        """How long the engines get after their SIGTERM before SIGKILL."""
        if self.drain_timeout_s > 0:
            return self.drain_timeout_s + STOP_MARGIN_S
        return STOP_TIMEOUT_S

    @property
    def stop_deadline(self) -> float | None:
        """time.monotonic() by which `stop` kills what is left; None before `terminate`."""
        if self._terminated_at is None:
            return None
        return self._terminated_at + self.stop_timeout_s

    def terminate(self) -> None:
        """SIGTERM every running engine's process group (they drain, if they were told to);
        the first call starts the stop deadline."""
        if self._terminated_at is None:
            self._terminated_at = time.monotonic()
        for proc in self._procs.values():
            if proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM every engine's process group (unless `terminate` did), wait until the stop
        deadline (`timeout` seconds from now when given), SIGKILL what is left (including what
        an engine that died by itself left behind), and log the exit codes. Safe to call more
        than once."""
        if self._stopped:
            return
        self._stopped = True
        if self._terminated_at is None:
            self.terminate()
        if timeout is None:
            timeout = self.stop_timeout_s
            deadline = self.stop_deadline or time.monotonic()
        else:
            deadline = time.monotonic() + timeout
        for rank, proc in self._procs.items():
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("engine rank %d did not stop within %g s; killing it", rank, timeout)
        for proc in self._procs.values():
            _signal_group(proc, signal.SIGKILL)
        for rank, proc in self._procs.items():
            logger.info("engine rank %d (pid %d) exited with code %s", rank, proc.pid, proc.wait())


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """Signal the process group the engine leads, so that its helper processes go too.

    Its id cannot have been reused while the engine is unreaped or any member is left (Linux
    keeps a pid in use while it names a live group); after that it could only name the group
    of a new process that took the same pid and made itself a group leader, which needs the
    pid space to wrap around in between."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:  # the group is gone (the engine and its helpers exited)
        pass
    except PermissionError:
        logger.warning("cannot signal the process group of engine pid %d", proc.pid)
        proc.send_signal(sig)  # the engine alone (a no-op once it is reaped)
