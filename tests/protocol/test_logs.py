from __future__ import annotations

import json
import logging

import pytest

from kubellm.protocol.logs import configure_logging


@pytest.fixture(autouse=True)
def _restore_root_logger(monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    monkeypatch.delenv("KUBELLM_LOG_FORMAT", raising=False)
    monkeypatch.delenv("KUBELLM_LOG_LEVEL", raising=False)
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", "info")
    logging.getLogger("kubellm.test").info("engine ready: %d blocks", 42)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    entry = json.loads(line)
    assert entry["message"] == "engine ready: 42 blocks"
    assert entry["level"] == "INFO"
    assert entry["logger"] == "kubellm.test"


def test_children_inherit_the_choice_through_the_environment() -> None:
    import os

    configure_logging("json", "debug")
    assert os.environ["KUBELLM_LOG_FORMAT"] == "json"
    assert os.environ["KUBELLM_LOG_LEVEL"] == "DEBUG"


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown log format"):
        configure_logging("xml")
