"""`kubellm` CLI: flags generated from the settings, errors name the flag and exit 2."""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from kubellm.protocol.settings import EngineSettings, FrontendSettings, ServeSettings
from kubellm.server import cli, launcher


def _parse(argv: list[str], env: dict[str, str] | None = None) -> ServeSettings:
    parser = cli.build_parser()
    return cli.parse_serve_settings(parser, parser.parse_args(argv), env or {})


def _exit_message(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as info:
        cli.main(argv, environ={})
    assert info.value.code == 2
    return capsys.readouterr().err


def test_serve_flags_parse_into_settings() -> None:
    settings = _parse(
        ["serve", "/models/x", "--port", "0", "--served-model-name", "a", "b", "--api-key", "k"]
    )
    assert settings.engine.model == "/models/x"
    assert settings.frontend.port == 0
    assert settings.frontend.served_model_name == ("a", "b")
    assert settings.frontend.api_key == ("k",)


def test_environment_is_read_and_cli_wins() -> None:
    env = {"KUBELLM_PORT": "9001", "KUBELLM_SHUTDOWN_TIMEOUT": "7"}
    settings = _parse(["serve", "--port", "9002"], env)
    assert settings.frontend.port == 9002
    assert settings.frontend.shutdown_timeout == 7.0


def test_uds_with_host_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    err = _exit_message(["serve", "--uds", "/tmp/k.sock", "--host", "127.0.0.1"], capsys)
    assert "--uds and --host are mutually exclusive" in err
    assert "kubellm serve: error:" in err


def test_ssl_keyfile_without_certfile_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    err = _exit_message(["serve", "--ssl-keyfile", "/tmp/key.pem"], capsys)
    assert "--ssl-keyfile and --ssl-certfile must be given together" in err


def test_out_of_range_value_names_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    err = _exit_message(["serve", "--port", "70000"], capsys)
    assert "--port" in err


def test_unknown_choice_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    err = _exit_message(["serve", "--engine-backend", "nope"], capsys)
    assert "--engine-backend" in err


def test_no_command_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    _exit_message([], capsys)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("kubellm ")


def test_every_field_has_help_text() -> None:
    for section in ("engine", "frontend"):
        model = ServeSettings.model_fields[section].annotation
        assert isinstance(model, type)
        for name, info in model.model_fields.items():
            assert info.description and len(info.description) > 10, f"{section}.{name}"


def test_every_flag_shows_help_and_env() -> None:
    parser = cli.build_parser()
    serve = cli._subparser(parser, "serve")
    flags = [a for a in serve._actions if a.option_strings and a.dest not in ("help",)]
    assert len(flags) > 40
    for action in flags:
        assert action.help and action.help != argparse.SUPPRESS, action.option_strings
        if action.option_strings != ["--model"]:  # the positional MODEL's alias
            assert "[env: KUBELLM_" in action.help, action.option_strings
    assert "--max-model-len" in serve.format_help()


# ------------------------------------------------------------------ launcher phases (fakes)


class FakeServer:
    should_exit = False
    force_exit = False


class FakeEngine:
    def __init__(self, in_flight: tuple[str, ...] = ()) -> None:
        self._queues = dict.fromkeys(in_flight)
        self.errored = False
        self.dead_error: Exception | None = None
        self.aborted: list[list[str]] = []

    @property
    def num_in_flight(self) -> int:
        return len(self._queues)

    def in_flight_request_ids(self) -> list[str]:
        return list(self._queues)

    async def abort(self, ids: list[str]) -> None:
        self.aborted.append(list(ids))
        self._queues.clear()


def fake_state(engine: FakeEngine, shutdown_timeout: float = 0.0) -> Any:
    frontend = FrontendSettings(shutdown_timeout=shutdown_timeout)
    return SimpleNamespace(
        settings=ServeSettings(frontend=frontend), engine=engine, server_load=0, draining=False
    )


async def test_watchdog_stops_the_server_when_the_engine_dies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("KUBELLM_KEEP_ALIVE_ON_ENGINE_DEATH", raising=False)
    server, engine = FakeServer(), FakeEngine()
    task = asyncio.create_task(launcher.watchdog_loop(server, fake_state(engine), 0.01))  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    assert not task.done() and not server.should_exit
    engine.errored = True
    await asyncio.wait_for(task, 5)
    assert server.should_exit


async def test_watchdog_keeps_the_server_alive_when_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KUBELLM_KEEP_ALIVE_ON_ENGINE_DEATH", "true")
    server, engine = FakeServer(), FakeEngine()
    engine.errored = True
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(launcher.watchdog_loop(server, fake_state(engine), 0.01), 0.2)  # type: ignore[arg-type]
    assert not server.should_exit


async def test_drain_waits_for_in_flight_requests() -> None:
    server, engine = FakeServer(), FakeEngine(("a",))
    state = fake_state(engine, shutdown_timeout=30)
    drain = launcher.Drain(server, state)  # type: ignore[arg-type]
    drain.on_signal(signal.SIGTERM)
    assert state.draining and drain.started
    await asyncio.sleep(0.2)
    assert not server.should_exit
    engine._queues.clear()  # the request finished
    for _ in range(100):
        if server.should_exit:
            break
        await asyncio.sleep(0.02)
    assert server.should_exit and engine.aborted == []


async def test_drain_with_zero_timeout_aborts_in_flight_requests() -> None:
    server, engine = FakeServer(), FakeEngine(("a", "b"))
    drain = launcher.Drain(server, fake_state(engine, shutdown_timeout=0))  # type: ignore[arg-type]
    drain.on_signal(signal.SIGTERM)
    for _ in range(100):
        if server.should_exit:
            break
        await asyncio.sleep(0.02)
    assert server.should_exit
    assert engine.aborted == [["a", "b"]]


def test_bind_uds_replaces_a_stale_socket_and_refuses_other_files(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays behind, as after a crash
    sock = launcher.bind_socket(FrontendSettings(uds=str(path)))
    assert launcher.describe_address(sock) == f"unix:{path}"
    launcher.close_socket(sock, str(path))
    assert not path.exists()
    path.write_text("precious")
    with pytest.raises(launcher.StartupError, match="not a socket"):
        launcher.bind_socket(FrontendSettings(uds=str(path)))
    assert path.read_text() == "precious"


def test_bind_tcp_port_zero_picks_a_port() -> None:
    sock = launcher.bind_socket(FrontendSettings(host="127.0.0.1", port=0))
    try:
        port = sock.getsockname()[1]
        assert port != 0
        assert launcher.describe_address(sock) == f"http://127.0.0.1:{port}"
        assert launcher.describe_address(sock, tls=True) == f"https://127.0.0.1:{port}"
    finally:
        sock.close()


def _has_ipv6_loopback() -> bool:
    """The machine can bind [::1] at all (some containers have no IPv6)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_bind_tcp_ipv6_address_format() -> None:
    sock = launcher.bind_socket(FrontendSettings(host="::1", port=0))
    try:
        assert sock.family == socket.AF_INET6
        assert launcher.describe_address(sock).startswith("http://[::1]:")
    finally:
        sock.close()


def test_bind_failure_is_a_startup_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(launcher.StartupError, match=f"port {port}"):
            launcher.bind_socket(FrontendSettings(host="127.0.0.1", port=port))


def test_served_model_names() -> None:
    from_dir = ServeSettings(engine=EngineSettings(model="/models/qwen-0.5b"))
    assert launcher.served_model_names(from_dir, "/models/qwen-0.5b") == ("qwen-0.5b",)
    embedded = ServeSettings()
    cache_dir = "/cache/models/SmolLM2-135M-Instruct-1c0564edf901"
    assert launcher.served_model_names(embedded, cache_dir) == ("SmolLM2-135M-Instruct",)
    named = ServeSettings(frontend=FrontendSettings(served_model_name=("a", "b")))
    assert launcher.served_model_names(named, "/models/x") == ("a", "b")


# ------------------------------------------------------------------ shapes and parallel flags


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--headless", "--api-server-count", "2"], ["--headless", "--api-server-count"]),
        (
            ["--data-parallel-size", "2", "--data-parallel-start-rank", "2", "--headless"],
            ["--data-parallel-start-rank", "--data-parallel-size"],
        ),
        (
            [
                "--headless",
                "--data-parallel-size",
                "4",
                "--data-parallel-start-rank",
                "2",
                "--data-parallel-size-local",
                "3",
            ],
            ["--data-parallel-start-rank", "--data-parallel-size-local", "--data-parallel-size"],
        ),
        (["--api-server-count", "0"], ["--api-server-count", "--headless"]),
        (
            ["--data-parallel-size", "2", "--data-parallel-address", "0.0.0.0"],
            ["--data-parallel-address"],
        ),
        (["--data-parallel-address", "::"], ["--data-parallel-address"]),
        (
            ["--data-parallel-size", "2", "--min-ready-engines", "3"],
            ["--min-ready-engines", "--data-parallel-size"],
        ),
        (["--data-parallel-start-rank", "1", "--data-parallel-size", "2"], ["--headless"]),
        (["--headless", "--data-parallel-size-local", "0"], ["--headless"]),
    ],
)
def test_incoherent_parallel_flags_exit_2_naming_them(
    argv: list[str], named: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    err = _exit_message(["serve", *argv], capsys)
    assert "kubellm serve: error:" in err
    for flag in named:
        assert flag in err, (flag, err)


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, ServeSettings]] = []

    def shape(self, name: str) -> Any:
        def run(settings: ServeSettings) -> int:
            self.calls.append((name, settings))
            return 7

        return run


@pytest.mark.parametrize(
    ("argv", "shape"),
    [
        ([], "single"),
        (["--data-parallel-size", "1", "--api-server-count", "1"], "single"),
        (["--api-server-count", "2"], "multi"),
        (["--data-parallel-size", "2"], "multi"),  # N defaults to the data-parallel size
        (["--data-parallel-size", "2", "--api-server-count", "1"], "single"),
        (
            ["--data-parallel-size", "2", "--data-parallel-start-rank", "1", "--headless"],
            "headless",
        ),
    ],
)
def test_serve_dispatches_on_the_shape(
    argv: list[str], shape: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubellm.protocol import logs
    from kubellm.server import supervisor

    recorder = _Recorder()
    monkeypatch.setattr(logs, "configure_logging", lambda *a, **k: None)
    monkeypatch.setattr(launcher, "run_server", recorder.shape("single"))
    monkeypatch.setattr(supervisor, "run_multi", recorder.shape("multi"))
    monkeypatch.setattr(supervisor, "run_headless", recorder.shape("headless"))
    assert cli.main(["serve", *argv], environ={}) == 7
    assert [name for name, _ in recorder.calls] == [shape]


def test_zmq_keys_writes_both_key_pairs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import zmq.auth

    keys = tmp_path / "keys"
    assert cli.main(["zmq-keys", str(keys)]) == 0
    out = capsys.readouterr().out
    names = {"head.key", "head.key_secret", "engine.key", "engine.key_secret"}
    assert {p.name for p in keys.iterdir()} == names
    for name in names:
        assert f"wrote {keys / name}" in out
    assert "head pods (API servers) need: head.key_secret, engine.key" in out
    assert "engine pods (--headless) need: engine.key_secret, head.key" in out
    for secret in ("head.key_secret", "engine.key_secret"):
        assert (keys / secret).stat().st_mode & 0o077 == 0
        public, private = zmq.auth.load_certificate(keys / secret)
        assert private is not None
        assert zmq.auth.load_certificate(keys / secret.replace("_secret", ""))[0] == public


def test_zmq_keys_keeps_existing_keys_unless_forced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["zmq-keys", str(tmp_path)]) == 0
    before = (tmp_path / "head.key_secret").read_bytes()
    capsys.readouterr()
    assert cli.main(["zmq-keys", str(tmp_path)]) == 1
    assert "--force" in capsys.readouterr().err
    assert (tmp_path / "head.key_secret").read_bytes() == before
    assert cli.main(["zmq-keys", str(tmp_path), "--force"]) == 0
    assert (tmp_path / "head.key_secret").read_bytes() != before


def test_api_server_config_round_trips_the_settings() -> None:
    from kubellm.server.supervisor import ApiServerConfig

    settings = _parse(
        ["serve", "/m", "--api-server-count", "3", "--api-key", "k", "--served-model-name", "a"]
    )
    config = ApiServerConfig(
        settings=settings,
        client_index=2,
        client_input="ipc:///tmp/x/input-2",
        client_output="ipc:///tmp/x/output-2",
        listen_fd=5,
        supervisor_pid=1234,
    )
    again = ApiServerConfig.model_validate_json(config.model_dump_json())
    assert again == config
    assert again.settings.frontend.api_key == ("k",)
    assert again.settings.parallel.api_servers == 3


def test_api_server_rejects_a_bad_config(capsys: pytest.CaptureFixture[str]) -> None:
    from kubellm.server.supervisor import api_server_main

    with pytest.raises(SystemExit) as info:
        api_server_main(["--config-json", '{"client_index": -1, "listen_fd": "secret-key"}'])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid --config-json" in err
    assert "client_index: Input should be greater than or equal to 0" in err
    assert "secret-key" not in err
