"""Flags and env vars are generated from the settings models; CLI > env > default."""

from __future__ import annotations

import argparse

import pytest

from kubellm.protocol import cli
from kubellm.protocol.settings import EngineSettings, FrontendSettings, ServeSettings


def parse(argv: list[str], env: dict[str, str] | None = None) -> ServeSettings:
    parser = argparse.ArgumentParser()
    cli.add_model_arguments(parser, ServeSettings)
    settings = cli.settings_from_namespace(ServeSettings, parser.parse_args(argv), env or {})
    assert isinstance(settings, ServeSettings)
    return settings


def test_defaults() -> None:
    assert parse([]) == ServeSettings()


def test_precedence_cli_over_env_over_default() -> None:
    env = {"KUBELLM_PORT": "9000", "KUBELLM_MAX_NUM_SEQS": "3"}
    s = parse(["--port", "9100"], env)
    assert s.frontend.port == 9100
    assert s.engine.max_num_seqs == 3
    assert s.engine.block_size == EngineSettings().block_size


def test_positional_model_and_flag() -> None:
    assert parse(["/models/x"]).engine.model == "/models/x"
    assert parse(["--model", "/models/y"]).engine.model == "/models/y"


def test_lists_booleans_and_env_lists() -> None:
    s = parse(["--api-key", "a", "b", "--no-enable-prefix-caching", "--allow-credentials"])
    assert s.frontend.api_key == ("a", "b")
    assert s.engine.enable_prefix_caching is False
    assert s.frontend.allow_credentials is True
    env = {"KUBELLM_API_KEY": "k1, k2", "KUBELLM_ENABLE_REQUEST_ID_HEADERS": "true"}
    s = parse([], env)
    assert s.frontend.api_key == ("k1", "k2")
    assert s.frontend.enable_request_id_headers is True


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--max-num-seqs", "0"], {}, "--max-num-seqs"),
        (["--uds", "/tmp/s", "--host", "::1"], {}, "mutually exclusive"),
        (["--ssl-keyfile", "k.pem"], {}, "--ssl-certfile"),
        (["--dummy-behaviour", "hang_after_tokens=1"], {}, "--engine-backend dummy"),
        ([], {"KUBELLM_ENFORCE_EAGER": "maybe"}, "KUBELLM_ENFORCE_EAGER"),
        ([], {"KUBELLM_PORT": "eighty"}, "--port"),
    ],
)
def test_incoherent_settings_are_refused_with_the_flag_named(
    argv: list[str], env: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        parse(argv, env)


def test_every_field_has_help_text() -> None:
    for model in (EngineSettings, FrontendSettings):
        for name, info in model.model_fields.items():
            assert info.description, f"{model.__name__}.{name} has no docstring"


def test_to_args_round_trips() -> None:
    s = parse(
        ["/m", "--max-model-len", "512", "--api-key", "a", "b", "--no-enable-prefix-caching"],
        {"KUBELLM_PORT": "9000", "KUBELLM_SHUTDOWN_TIMEOUT": "2.5"},
    )
    args = cli.to_args(s)
    assert parse(args) == s
