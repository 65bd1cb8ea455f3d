"""The engine-link helpers shared by heads and engines (torch-free)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import zmq

from kubellm.engine.transport import (
    compat_mismatches,
    create_curve_keys,
    curve_allowed_clients,
    curve_client,
    engine_compat,
    engine_identity,
    model_digest,
    parse_engine_identity,
    revision_string,
    tcp_address,
)
from kubellm.protocol.settings import EngineSettings


def test_identity_round_trips_and_differs_per_incarnation() -> None:
    a, b = engine_identity(3, 1), engine_identity(3, 2**63 - 1)
    assert a != b
    assert parse_engine_identity(a) == (3, 1)
    assert parse_engine_identity(b) == (3, 2**63 - 1)
    assert parse_engine_identity(b"\x03\x00") is None


def _model(tmp_path: Path, max_pos: int) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": max_pos}))
    (tmp_path / "tokenizer.json").write_text("{}")
    return tmp_path


def test_model_digest_follows_config_and_tokenizer_not_weights(tmp_path: Path) -> None:
    one = _model(tmp_path / "one", 2048)
    two = _model(tmp_path / "two", 2048)
    (two / "model.safetensors").write_bytes(b"weights")
    assert model_digest(one) == model_digest(two)
    (two / "tokenizer.json").write_text('{"changed": true}')
    assert model_digest(one) != model_digest(two)


def test_compat_mismatches_name_each_differing_field(tmp_path: Path) -> None:
    model = _model(tmp_path / "m", 2048)
    head = engine_compat(EngineSettings(model=str(model)), "rev-1")
    assert compat_mismatches(head, head) == []
    engine = engine_compat(EngineSettings(model=str(model), max_model_len=512), "rev-2")
    problems = compat_mismatches(head, engine)
    assert len(problems) == 2
    assert "revision: head 'kubellm " in problems[0] and "/rev-1'" in problems[0]
    assert problems[1] == "max_model_len: head None, engine 512"


def test_revision_string() -> None:
    assert revision_string().startswith("kubellm ")
    assert revision_string("abc").endswith("/abc")


def test_compat_of_a_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        engine_compat(EngineSettings(model=str(tmp_path / "nope")))


def test_tcp_address_brackets_ipv6() -> None:
    assert tcp_address("10.0.0.1", 5) == "tcp://10.0.0.1:5"
    assert tcp_address("::1", 5) == "tcp://[::1]:5"
    assert tcp_address("[fd00::1]", 5) == "tcp://[fd00::1]:5"
    assert tcp_address("head.ns.svc", 5) == "tcp://head.ns.svc:5"


def test_curve_keys_are_created_and_loaded(tmp_path: Path) -> None:
    written = create_curve_keys(tmp_path / "keys")
    names = sorted(p.name for p in written)
    assert names == ["engine.key", "engine.key_secret", "head.key", "head.key_secret"]
    secret = tmp_path / "keys" / "engine.key_secret"
    assert secret.stat().st_mode & 0o077 == 0
    assert curve_allowed_clients(str(tmp_path / "keys")) == tmp_path / "keys"
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    try:
        curve_client(sock, str(tmp_path / "keys"))  # raises on a malformed key
        assert sock.getsockopt(zmq.MECHANISM) == zmq.CURVE
    finally:
        sock.close(linger=0)
        ctx.term()


def test_missing_curve_files_are_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"engine\.key does not exist"):
        curve_allowed_clients(str(tmp_path))
