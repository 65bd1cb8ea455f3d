"""`kubellm fetch-model` against a fake Hugging Face hub (tests/server/fake_hub.py)."""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from fake_hub import FakeHub, FakeRepo, tiny_llama_files  # type: ignore[import-not-found, unused-ignore]

from kubellm.server import cli, fetch

TOKEN = "hf_secret_token_123"
BAD_TOKEN = "hf_wrong_token_456"
SHA = "0123456789abcdef0123456789abcdef01234567"
SERVED = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
}


def _repos() -> dict[str, FakeRepo]:
    tiny = tiny_llama_files()
    extras = {
        "pytorch_model.bin": b"PICKLE" * 100,
        "README.md": b"# tiny\n",
        ".gitattributes": b"*.safetensors filter=lfs\n",
        "original/params.json": b"{}",
    }
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors"}}
    index["weight_map"]["b"] = "model-00002-of-00002.safetensors"
    sharded = {
        "config.json": tiny["config.json"],
        "model-00001-of-00002.safetensors": b"shard-1",
        "model-00002-of-00002.safetensors": b"shard-2",
        "model.safetensors.index.json": json.dumps(index).encode(),
        "consolidated.safetensors": b"all-the-weights-again",
    }
    return {
        "acme/tiny": FakeRepo(files={**tiny, **extras}, sha=SHA, branches=("main", "v1")),
        "acme/gated": FakeRepo(files=dict(tiny), sha="1" * 40, token=TOKEN),
        "acme/sharded": FakeRepo(files=sharded, sha="2" * 40),
        "acme/pickled": FakeRepo(
            files={"config.json": tiny["config.json"], "pytorch_model.bin": b"PICKLE"},
            sha="3" * 40,
        ),
    }


@pytest.fixture(autouse=True)
def _no_telemetry(monkeypatch: pytest.MonkeyPatch) -> None:
    """As `kubellm fetch-model` sets it: no request to huggingface.co for the user agent."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub(_repos()) as running:
        yield running


def _fetch(
    hub_url: str,
    dest: Path,
    *args: str,
    repo: str = "acme/tiny",
    env: dict[str, str] | None = None,
) -> int:
    """Parse like the CLI, then run the fetch in-process (without configure_logging)."""
    parsed = cli.build_parser().parse_args(["fetch-model", repo, "--dest", str(dest), *args])
    request = fetch.request_from_args(
        parsed.repo_id,
        revision=parsed.revision,
        dest=parsed.dest,
        token_file=parsed.token_file,
        include=parsed.include,
        force=parsed.force,
        config_only=parsed.config_only,
        environ={"HF_ENDPOINT": hub_url, **(env or {})},
    )
    return fetch.run_fetch(request)


def _files(dest: Path) -> set[str]:
    return {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()} - {
        p.relative_to(dest).as_posix() for p in (dest / ".cache").rglob("*")
    }


def _downloads(hub: FakeHub) -> list[str]:
    return [r for r in hub.requests if r.startswith("GET") and "/resolve/" in r]


def test_fetch_writes_the_served_files_and_a_marker(hub: FakeHub, tmp_path: Path) -> None:
    from kubellm.engine.config import ModelConfig

    dest = tmp_path / "models" / "nested"
    assert _fetch(hub.url, dest) == 0
    assert _files(dest) == SERVED | {fetch.MARKER}
    marker = json.loads((dest / fetch.MARKER).read_text())
    assert marker["repo_id"] == "acme/tiny"
    assert marker["revision"] == "main"
    assert marker["sha"] == SHA
    assert marker["complete"] is True
    assert marker["files"] == {name: (dest / name).stat().st_size for name in SERVED}
    assert (dest / "model.safetensors").read_bytes() == hub.repos["acme/tiny"].files[
        "model.safetensors"
    ]
    cfg = ModelConfig.from_dir(dest)
    assert (cfg.architecture, cfg.hidden_size, cfg.vocab_size) == ("LlamaForCausalLM", 32, 64)
    assert not any("pytorch_model.bin" in r or "README" in r for r in hub.requests)


@pytest.mark.slow
def test_the_fetched_model_loads_into_the_engine(hub: FakeHub, tmp_path: Path) -> None:
    import torch

    from kubellm.engine.config import ModelConfig
    from kubellm.engine.loader import load_weights
    from kubellm.engine.models import build_model

    torch.set_num_threads(1)
    assert _fetch(hub.url, tmp_path) == 0
    cfg = ModelConfig.from_dir(tmp_path)
    model = build_model(cfg, cfg.max_position_embeddings, torch.float32, torch.device("cpu"))
    load_weights(model, tmp_path)  # strict: raises on a missing or unexpected tensor
    assert torch.isfinite(next(model.parameters())).all()


def test_rerun_with_the_hub_down_makes_no_network_call(
    hub: FakeHub, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert _fetch(hub.url, tmp_path) == 0
    seen = len(hub.requests)
    url = hub.url
    hub.stop()
    with caplog.at_level(logging.INFO, logger="kubellm.server.fetch"):
        assert _fetch(url, tmp_path) == 0
    assert len(hub.requests) == seen
    assert "already fetched acme/tiny at main" in caplog.text


def test_rerun_after_a_lost_file_fetches_only_that_file(hub: FakeHub, tmp_path: Path) -> None:
    assert _fetch(hub.url, tmp_path) == 0
    (tmp_path / "model.safetensors").unlink()
    before = len(_downloads(hub))
    assert _fetch(hub.url, tmp_path) == 0
    again = _downloads(hub)[before:]
    assert len(again) == 1 and again[0].endswith("/model.safetensors")
    assert (tmp_path / "model.safetensors").is_file()


def test_an_interrupted_fetch_of_the_same_model_resumes(hub: FakeHub, tmp_path: Path) -> None:
    marker = fetch.Marker("acme/tiny", "main", SHA, {}, complete=False)
    fetch.write_marker(tmp_path, marker)
    (tmp_path / "config.json").write_bytes(b"{partial")
    assert _fetch(hub.url, tmp_path) == 0
    assert json.loads((tmp_path / "config.json").read_text())["hidden_size"] == 32
    assert json.loads((tmp_path / fetch.MARKER).read_text())["complete"] is True


@pytest.mark.parametrize(
    ("repo", "revision"), [("acme/tiny", "no-such-branch"), ("acme/missing", "main")]
)
def test_unknown_repo_or_revision_exits_1_with_one_line(
    hub: FakeHub, tmp_path: Path, capsys: pytest.CaptureFixture[str], repo: str, revision: str
) -> None:
    assert _fetch(hub.url, tmp_path, "--revision", revision, repo=repo) == 1
    err = capsys.readouterr().err
    assert err == (
        f"kubellm fetch-model: error: no model {repo} at revision {revision} on {hub.url}\n"
    )


def test_gated_repo_needs_the_token_and_never_prints_it(
    hub: FakeHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _fetch(hub.url, tmp_path / "a", repo="acme/gated") == 1
    err = capsys.readouterr().err
    assert "the token cannot read acme/gated (gated or private model?)" in err
    assert "no token was given" in err
    assert _fetch(hub.url, tmp_path / "b", repo="acme/gated", env={"HF_TOKEN": BAD_TOKEN}) == 1
    out = capsys.readouterr()
    assert "the token cannot read acme/gated" in out.err
    assert BAD_TOKEN not in out.err + out.out
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    assert _fetch(hub.url, tmp_path / "c", "--token-file", str(token_file), repo="acme/gated") == 0
    assert _files(tmp_path / "c") == SERVED | {fetch.MARKER}
    assert TOKEN not in capsys.readouterr().err


def test_include_replaces_the_default_set(hub: FakeHub, tmp_path: Path) -> None:
    args = ("--include", "config.json", "--include", "*.safetensors", "--include", "*.md")
    assert _fetch(hub.url, tmp_path, *args) == 0
    assert _files(tmp_path) == {"config.json", "model.safetensors", "README.md", fetch.MARKER}


def test_other_include_patterns_refetch_and_drop_unused_files(hub: FakeHub, tmp_path: Path) -> None:
    assert _fetch(hub.url, tmp_path) == 0
    assert _fetch(hub.url, tmp_path, "--include", "config.json", "--include", "*.safetensors") == 0
    assert _files(tmp_path) == {"config.json", "model.safetensors", fetch.MARKER}
    marker = fetch.read_marker(tmp_path)
    assert marker is not None and marker.include == ("config.json", "*.safetensors")


def test_config_only_fetches_no_weights(hub: FakeHub, tmp_path: Path) -> None:
    assert _fetch(hub.url, tmp_path, "--config-only", repo="acme/sharded") == 0
    assert _files(tmp_path) == {"config.json", fetch.MARKER}
    assert _fetch(hub.url, tmp_path / "tiny", "--config-only") == 0
    assert _files(tmp_path / "tiny") == SERVED - {"model.safetensors"} | {fetch.MARKER}
    assert not any(".safetensors" in r for r in hub.requests)
    seen = len(hub.requests)
    assert _fetch(hub.url, tmp_path / "tiny", "--config-only") == 0  # already fetched
    assert len(hub.requests) == seen


def test_sharded_repo_skips_shards_the_index_does_not_name(hub: FakeHub, tmp_path: Path) -> None:
    assert _fetch(hub.url, tmp_path, repo="acme/sharded") == 0
    assert _files(tmp_path) == {
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        fetch.MARKER,
    }
    assert not any("consolidated" in r for r in hub.requests)


def test_pickle_only_repo_is_refused_before_downloading(
    hub: FakeHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _fetch(hub.url, tmp_path, repo="acme/pickled") == 1
    err = capsys.readouterr().err
    assert "no *.safetensors" in err and "pytorch_model.bin" in err
    assert _downloads(hub) == []


def test_another_model_in_dest_needs_force(
    hub: FakeHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _fetch(hub.url, tmp_path) == 0
    assert _fetch(hub.url, tmp_path, repo="acme/sharded") == 1
    err = capsys.readouterr().err
    assert "already holds acme/tiny at revision main; pass --force" in err
    assert _fetch(hub.url, tmp_path, "--revision", "v1") == 1
    assert "pass --force" in capsys.readouterr().err
    assert _fetch(hub.url, tmp_path, "--force", repo="acme/sharded") == 0
    files = _files(tmp_path)
    assert "model.safetensors" not in files and "tokenizer.json" not in files
    assert json.loads((tmp_path / fetch.MARKER).read_text())["repo_id"] == "acme/sharded"


def test_a_non_empty_dest_of_unknown_origin_needs_force(
    hub: FakeHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "weights.safetensors").write_bytes(b"mine")
    assert _fetch(hub.url, tmp_path) == 1
    assert "was not filled by kubellm fetch-model; pass --force" in capsys.readouterr().err
    assert hub.requests == []


def test_offline_mode_accepts_only_a_complete_dest(
    hub: FakeHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    offline = {"HF_HUB_OFFLINE": "1"}
    assert _fetch(hub.url, tmp_path / "a", env=offline) == 1
    assert "HF_HUB_OFFLINE is set" in capsys.readouterr().err
    assert hub.requests == []
    assert _fetch(hub.url, tmp_path / "b") == 0
    seen = len(hub.requests)
    assert _fetch(hub.url, tmp_path / "b", env=offline) == 0
    assert len(hub.requests) == seen


def test_unreachable_hub_names_the_endpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    assert _fetch(url, tmp_path) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"kubellm fetch-model: error: cannot reach {url}")
    assert "HF_ENDPOINT" in err and "PVC" in err
    assert err.count("\n") == 1


def test_disk_full_is_reported_before_downloading(
    hub: FakeHub,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    full = SimpleNamespace(total=1 << 20, used=1 << 20, free=100)
    monkeypatch.setattr(fetch.shutil, "disk_usage", lambda _path: full)
    assert _fetch(hub.url, tmp_path) == 1
    err = capsys.readouterr().err
    assert "disk full" in err and "100 B free" in err
    assert _downloads(hub) == []


def test_no_space_while_writing_is_one_line(tmp_path: Path) -> None:
    request = fetch.FetchRequest("acme/tiny", "main", tmp_path, "http://hub")
    error = OSError(errno.ENOSPC, "No space left on device")
    explained = fetch.explain_error(RuntimeError("wrapped"), request)
    assert explained is None  # a bug keeps its traceback
    try:
        raise RuntimeError("download failed") from error
    except RuntimeError as wrapped:
        explained = fetch.explain_error(wrapped, request)
    assert explained is not None
    assert str(explained) == f"disk full while writing into {tmp_path}: No space left on device"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["fetch-model", "not a repo!", "--dest", "/tmp/x"], "is not a valid hub repo id"),
        (["fetch-model", "acme/tiny", "--dest", "/tmp/x", "--revision", ""], "--revision"),
        (["fetch-model", "acme/tiny"], "--dest"),
        (["fetch-model", "a/b", "--dest", "/x", "--config-only", "--include", "*"], "exclusive"),
        (["fetch-model", "acme/tiny", "--dest", "/tmp/x", "--token-file", "/nope"], "/nope"),
    ],
)
def test_bad_arguments_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(argv, environ={})
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "kubellm fetch-model: error:" in err and message in err


def _kubellm(
    args: list[str], hub_url: str, tmp_path: Path, **env: str
) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("kubellm")
    environ = {
        **os.environ,
        "HF_ENDPOINT": hub_url,
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "OMP_NUM_THREADS": "1",
        **env,
    }
    environ.pop("HF_HUB_OFFLINE", None)
    return subprocess.run(
        [str(exe), "fetch-model", *args],
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.slow
@pytest.mark.integration
def test_the_real_entry_point(hub: FakeHub, tmp_path: Path) -> None:
    dest = tmp_path / "models"
    ok = _kubellm(["acme/gated", "--dest", str(dest)], hub.url, tmp_path, HF_TOKEN=TOKEN)
    assert ok.returncode == 0, ok.stderr
    assert _files(dest) == SERVED | {fetch.MARKER}
    assert "fetched acme/gated at main" in ok.stderr and TOKEN not in ok.stderr + ok.stdout
    denied = _kubellm(
        ["acme/gated", "--dest", str(tmp_path / "other")], hub.url, tmp_path, HF_TOKEN=BAD_TOKEN
    )
    assert denied.returncode == 1
    assert "the token cannot read acme/gated" in denied.stderr
    assert "Traceback" not in denied.stderr and BAD_TOKEN not in denied.stderr
