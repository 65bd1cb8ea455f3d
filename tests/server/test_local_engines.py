"""LocalEngines: spawning and stopping engine processes (a fake `kubellm-engine` here)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import zmq

from kubellm.engine.transport import engine_compat
from kubellm.protocol.settings import EngineSettings, ParallelSettings, ServeSettings
from kubellm.server import local_engines
from kubellm.server.coordinator import Coordinator
from kubellm.server.head import HeadPlan
from kubellm.server.local_engines import LocalEngines

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

FAKE_ENGINE = r"""
import json, os, signal, subprocess, sys, time

config = json.loads(sys.argv[sys.argv.index("--config-json") + 1])
mode = os.environ.get("FAKE_ENGINE_MODE", "")
if mode == "ignore-term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
helper = subprocess.Popen(["sleep", "300"])  # a child in the engine's process group
config["helper_pid"] = helper.pid
path = os.path.join(os.environ["FAKE_ENGINE_DIR"], f"{config['engine_index']}.json")
with open(path + ".tmp", "w") as f:
    json.dump(config, f)
os.replace(path + ".tmp", path)
while True:
    time.sleep(0.1)
"""


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _eventually(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def fake_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Makes LocalEngines spawn the fake engine, which writes its config into the dir."""
    script = tmp_path / "fake_engine.py"
    script.write_text(FAKE_ENGINE)
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(local_engines, "engine_command", lambda: [sys.executable, str(script)])
    monkeypatch.setenv("FAKE_ENGINE_DIR", str(out))
    return out


@pytest.fixture
def make_engines() -> Iterator[Callable[..., LocalEngines]]:
    made: list[LocalEngines] = []

    def make(ranks: tuple[int, ...], settings: ServeSettings | None = None) -> LocalEngines:
        engines = LocalEngines(
            settings or ServeSettings(), "ipc:///nowhere/coordinator", ranks, monitor_address=None
        )
        made.append(engines)
        engines.start()
        return engines

    yield make
    for engines in made:
        engines.stop(timeout=1.0)


def _configs(out: Path, ranks: tuple[int, ...]) -> dict[int, dict[str, Any]]:
    _eventually(lambda: all((out / f"{r}.json").exists() for r in ranks), "the fake engines")
    return {r: json.loads((out / f"{r}.json").read_text()) for r in ranks}


def test_engine_config_and_process_groups(
    fake_dir: Path, make_engines: Callable[..., LocalEngines]
) -> None:
    settings = ServeSettings(
        engine=EngineSettings(engine_backend="dummy", max_num_seqs=7),
        parallel=ParallelSettings(
            headless=True,
            data_parallel_size=4,
            data_parallel_start_rank=2,
            deployment_revision="rev-9",
            head_timeout_s=12.5,
            registration_timeout_s=33.0,
            zmq_curve_dir="/keys",
        ),
    )
    engines = LocalEngines(settings, "tcp://head:29550", [2, 3], monitor_address="ipc:///m")
    try:
        engines.start()
        configs = _configs(fake_dir, (2, 3))
    finally:
        engines.stop(timeout=1.0)
    assert engines.ranks == (2, 3)
    for rank, config in configs.items():
        assert config["engine_index"] == rank
        assert config["coordinator_address"] == "tcp://head:29550"
        assert config["parent_pid"] == os.getpid()
        assert config["revision"] == "rev-9"
        assert config["head_timeout_s"] == 12.5
        assert config["registration_timeout_s"] == 33.0
        assert config["curve_dir"] == "/keys"
        assert config["monitor_address"] == "ipc:///m"
        assert EngineSettings.model_validate(config["settings"]) == settings.engine
    assert set(engines.pids) == {2, 3}
    assert engines.exited() == {2: 0, 3: 0}  # exit 0 on SIGTERM


def test_own_process_group_and_stop_leaves_nothing(
    fake_dir: Path, make_engines: Callable[..., LocalEngines]
) -> None:
    engines = make_engines((0, 1))
    configs = _configs(fake_dir, (0, 1))
    pids = engines.pids
    for rank, pid in pids.items():
        assert os.getpgid(pid) == pid
        assert os.getpgid(configs[rank]["helper_pid"]) == pid
    assert engines.exited() == {}
    engines.stop()
    engines.stop()  # idempotent
    everything = list(pids.values()) + [c["helper_pid"] for c in configs.values()]
    _eventually(lambda: all(_gone(pid) for pid in everything), "every process to be gone", 5)


def test_stop_kills_an_engine_that_ignores_sigterm(
    fake_dir: Path, make_engines: Callable[..., LocalEngines], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_ENGINE_MODE", "ignore-term")
    engines = make_engines((0,))
    config = _configs(fake_dir, (0,))[0]
    started = time.monotonic()
    engines.stop(timeout=0.5)
    assert time.monotonic() - started < 10
    assert engines.exited() == {0: -signal.SIGKILL}
    _eventually(lambda: _gone(config["helper_pid"]), "the engine's helper to be gone", 5)


def test_exited_reports_a_killed_engine(
    fake_dir: Path, make_engines: Callable[..., LocalEngines]
) -> None:
    engines = make_engines((0, 1))
    configs = _configs(fake_dir, (0, 1))
    os.kill(engines.pids[1], signal.SIGKILL)
    _eventually(lambda: engines.exited() == {1: -signal.SIGKILL}, "rank 1 to be reported")
    assert 0 not in engines.exited()
    assert not _gone(configs[1]["helper_pid"])  # the dead engine's helper is left behind...
    engines.stop()
    assert engines.exited() == {0: 0, 1: -signal.SIGKILL}
    helpers = [c["helper_pid"] for c in configs.values()]
    _eventually(lambda: all(_gone(pid) for pid in helpers), "...until stop() ends it", 5)


def test_spawn_failure_propagates(
    monkeypatch: pytest.MonkeyPatch, make_engines: Callable[..., LocalEngines]
) -> None:
    monkeypatch.setattr(local_engines, "engine_command", lambda: ["/nonexistent/kubellm-engine"])
    with pytest.raises(FileNotFoundError):
        make_engines((0, 1))


@pytest.mark.parametrize("ranks", [(0, 0), (-1,), (2**16,)])
def test_bad_ranks(ranks: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="ranks"):
        LocalEngines(ServeSettings(), "ipc:///nowhere", ranks)


def test_engine_command_runs_kubellm_engine() -> None:
    command = local_engines.engine_command()
    done = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "--config-json" in done.stdout


# -- real dummy engines registering with a real coordinator -----------------------------------


@pytest.fixture
def head_sockets() -> Iterator[Callable[[HeadPlan], None]]:
    """bind(plan): bind every API server's ROUTER and PULL, as API servers would (the engines'
    EngineReady and EngineDead are then delivered at once)."""
    ctx: zmq.Context[Any] = zmq.Context()
    sockets: list[zmq.Socket[Any]] = []

    def bind(plan: HeadPlan) -> None:
        for client in plan.clients_bind:
            sockets.append(ctx.socket(zmq.ROUTER))
            sockets[-1].bind(client.input)
            sockets.append(ctx.socket(zmq.PULL))
            sockets[-1].bind(client.output)

    yield bind
    for sock in sockets:
        sock.close(linger=0)
    ctx.term()


def test_real_engines_register_and_a_killed_one_is_released(
    head_sockets: Callable[[HeadPlan], None],
) -> None:
    settings = ServeSettings(
        engine=EngineSettings(engine_backend="dummy", heartbeat_interval_s=0.2),
        parallel=ParallelSettings(data_parallel_size=2),
    )
    plan = HeadPlan.create(settings.parallel)
    coordinator = Coordinator(
        plan,
        engine_compat(settings.engine),
        data_parallel_size=2,
        heartbeat_interval_s=0.2,
        engine_timeout_s=120.0,  # longer than the test: only the disconnect can release
    )
    engines = LocalEngines(settings, plan.coordinator_connect, [0, 1])
    try:
        head_sockets(plan)
        coordinator.start()
        engines.start()
        _eventually(lambda: len(coordinator.holders()) == 2, "both engines to register", 60)
        assert {r: h.pid for r, h in coordinator.holders().items()} == engines.pids
        os.kill(engines.pids[1], signal.SIGKILL)
        _eventually(lambda: 1 not in coordinator.holders(), "rank 1 to be released", 20)
        _eventually(lambda: engines.exited() == {1: -signal.SIGKILL}, "rank 1's exit code", 10)
        assert set(coordinator.holders()) == {0}
        pids = engines.pids
        engines.stop(timeout=20)
        assert engines.exited() == {0: 0, 1: -signal.SIGKILL}
        assert all(_gone(pid) for pid in pids.values())
        _eventually(lambda: coordinator.holders() == {}, "rank 0 to say goodbye", 10)
    finally:
        engines.stop()
        coordinator.stop()
        plan.cleanup()
