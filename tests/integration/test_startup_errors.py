"""A model that cannot be served fails start-up fast, non-zero, with a message that says why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import RemoteServer  # type: ignore[import-not-found, unused-ignore]

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def unsupported_checkpoint(directory: Path) -> Path:
    directory.mkdir()
    config = {"architectures": ["MistralForCausalLM"], "vocab_size": 100}
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("unsupported", "supported: LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"),
        ("missing", "does not exist"),
        ("Qwen/Qwen3-0.6B", "downloads from a model hub are not supported"),
    ],
)
def test_unservable_model_exits_non_zero_with_the_reason(
    tmp_path: Path, model: str, expected: str
) -> None:
    if model == "unsupported":
        model = str(unsupported_checkpoint(tmp_path / "mistral"))
    elif model == "missing":
        model = str(tmp_path / "missing")
    with RemoteServer([model], wait_healthy=False) as server:
        code = server.wait(30)
        assert code == 1, server.log_text()
        log = server.log_text()
        assert expected in log
        assert "the engine failed to start" in log
        assert "Traceback" not in log  # a user error, not a crash
