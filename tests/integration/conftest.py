"""Fixtures for tests that run `kubellm serve` as a real subprocess (vLLM's RemoteOpenAIServer).

Usage, with the torch-free dummy engine:

    def test_x(tiny_tokenizer_dir: Path) -> None:
        with RemoteServer([str(tiny_tokenizer_dir), "--engine-backend", "dummy"]) as server:
            completion = server.client().completions.create(
                model="tiny", prompt="hello", max_tokens=5
            )

`tiny_tokenizer_dir` (session-scoped) is a model directory with no weights: a byte-level BPE
`tokenizer.json` whose 32000 ids match the dummy engine's vocabulary (ids 0/1/2 are
<unk>/<s>/</s>, so EOS is 2 like `kubellm.engine.dummy.DUMMY_EOS_TOKEN_ID`; every other id
decodes to 1-3 printable characters), a `tokenizer_config.json` with bos/eos and a simple chat
template, and a minimal Llama `config.json`. The served model name is the directory's
basename, "tiny", unless --served-model-name is given.

`RemoteServer` picks a free port (adds --port, unless `port=`/`uds=` say otherwise), writes the
server's output to a temp log file, polls GET /health until 200 and fails with the log when
the process exits or the timeout passes. On exit it sends SIGTERM, waits, SIGKILLs
stragglers and asserts that no `kubellm-engine` child is left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import openai
import psutil
import pytest

SCRIPTS_DIR = Path(sys.executable).parent
KUBELLM = SCRIPTS_DIR / "kubellm"
TINY_VOCAB_SIZE = 32000
"""Equal to the dummy engine's vocabulary size."""
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _is_engine(proc: psutil.Process) -> bool:
    try:
        cmdline = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return "kubellm-engine" in cmdline or "kubellm.engine" in cmdline


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class RemoteServer:
    """`kubellm serve ARGS` in a subprocess, healthy on entry, stopped (no orphans) on exit."""

    def __init__(
        self,
        args: list[str],
        env: dict[str, str] | None = None,
        timeout: float = 60.0,
        *,
        port: int | None = None,
        uds: str | None = None,
        host: str = "127.0.0.1",
        wait_healthy: bool = True,
        prefix: list[str] | None = None,
    ) -> None:
        self.args = list(args)
        self.uds = uds
        self.host = host
        self.timeout = timeout
        self.wait_healthy = wait_healthy
        self.port = free_port() if port is None else port
        extra: list[str] = []
        if uds is not None:
            extra = ["--uds", uds]
        elif "--port" not in self.args:
            extra = ["--port", str(self.port)]
        if uds is None and "--host" not in self.args:
            extra += ["--host", host]
        # `prefix` runs it elsewhere, e.g. ["ip", "netns", "exec", NAME]; that execs in place,
        # so `proc.pid` is still the server's.
        self.command = [*(prefix or []), str(KUBELLM), "serve", *self.args, *extra]
        self.env = {"OMP_NUM_THREADS": "1", **os.environ, **(env or {})}
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed in __exit__
            prefix="kubellm-serve-", suffix=".log", delete=False
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self._engines: list[psutil.Process] = []

    # -- addresses and clients ------------------------------------------------------------

    @property
    def url(self) -> str:
        if self.uds is not None:
            return "http://localhost"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def http(self, **kwargs: Any) -> httpx.Client:
        """An httpx client for this server (over the UNIX socket when serving on one)."""
        transport = httpx.HTTPTransport(uds=self.uds) if self.uds is not None else None
        return httpx.Client(base_url=self.url, transport=transport, **kwargs)

    def client(self, api_key: str = "EMPTY", **kwargs: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, **kwargs)

    def async_client(self, api_key: str = "EMPTY", **kwargs: Any) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=api_key, **kwargs)

    def log_text(self) -> str:
        return Path(self._log.name).read_text(errors="replace")

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> RemoteServer:
        """Spawn the server (done by `with`); waits for /health unless wait_healthy=False."""
        if self.proc is not None:
            raise RuntimeError("this RemoteServer was already started")
        self.proc = subprocess.Popen(
            self.command, stdout=self._log, stderr=subprocess.STDOUT, env=self.env
        )
        if self.port == 0:
            self.port = self._wait_for_port()
        if self.wait_healthy:
            self.wait_until_healthy()
        return self

    def __enter__(self) -> RemoteServer:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _fail(self, why: str) -> None:
        pytest.fail(f"{why}\n--- kubellm serve log ---\n{self.log_text()}", pytrace=False)

    def _wait_for_port(self) -> int:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            found = re.search(r"serving on http://\S+:(\d+)", self.log_text())
            if found:
                return int(found.group(1))
            if self.proc is not None and self.proc.poll() is not None:
                self._fail(f"kubellm serve exited with code {self.proc.returncode}")
            time.sleep(0.1)
        self._fail(f"no 'serving on' line within {self.timeout:g} s")
        raise AssertionError("unreachable")

    def wait_until_healthy(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.timeout
        with self.http(timeout=2.0) as http:
            while True:
                if self.proc.poll() is not None:
                    self._fail(f"kubellm serve exited with code {self.proc.returncode}")
                with contextlib.suppress(httpx.HTTPError):
                    if self._accepting() and http.get("/health").status_code == 200:
                        self._engines = self.engine_processes()
                        return
                if time.monotonic() > deadline:
                    self._fail(f"/health was not 200 within {self.timeout:g} s")
                time.sleep(0.1)

    def _accepting(self) -> bool:
        """Whether a UNIX socket accepts connections (httpx leaks the socket of a failed UDS
        connect, which filterwarnings=error turns into a failure)."""
        if self.uds is None:
            return True
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(self.uds)
            except OSError:
                return False
        return True

    def engine_processes(self) -> list[psutil.Process]:
        if self.proc is None:
            return []
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        return [c for c in children if _is_engine(c)]

    def terminate(self) -> None:
        """Send SIGTERM to the server (only)."""
        assert self.proc is not None
        self._engines = self._engines or self.engine_processes()
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int | None:
        """The exit code, or None if still running after `timeout` seconds."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is None:
            self._log.close()
            return
        engines = self._engines or self.engine_processes()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            if self.wait(timeout) is None:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        self._assert_no_orphans(engines)

    def _assert_no_orphans(self, engines: list[psutil.Process]) -> None:
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and any(_alive(p) for p in engines):
            time.sleep(0.1)
        orphans = [p for p in engines if _alive(p)]
        for p in orphans:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        if orphans:
            self._fail(f"orphan kubellm-engine process(es) left: {[p.pid for p in orphans]}")


def engine_pid(server: RemoteServer) -> int:
    """The pid of the server's kubellm-engine child."""
    engines = server.engine_processes()
    if len(engines) != 1:
        raise AssertionError(f"expected one engine process, found {len(engines)}")
    return int(engines[0].pid)


# ------------------------------------------------------------------------- tiny tokenizer


def _byte_level_alphabet() -> list[str]:
    """GPT-2's byte → printable unicode mapping, in byte order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _tiny_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    specials = ["<unk>", "<s>", "</s>"]
    alphabet = _byte_level_alphabet()
    vocab: dict[str, int] = {t: i for i, t in enumerate(specials)}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    ascii_chars = [alphabet[b] for b in range(32, 127)]  # space is "Ġ" in byte-level
    merges: list[tuple[str, str]] = []
    for a in ascii_chars:
        for b in ascii_chars:
            vocab[a + b] = len(vocab)
            merges.append((a, b))
    lower_pairs = [
        a + b for a in "abcdefghijklmnopqrstuvwxyz" for b in "abcdefghijklmnopqrstuvwxyz"
    ]
    for pair in lower_pairs:
        for c in ascii_chars:
            if len(vocab) >= TINY_VOCAB_SIZE:
                return vocab, merges
            vocab[pair + c] = len(vocab)
            merges.append((pair, c))
    return vocab, merges


def write_tiny_tokenizer(directory: Path) -> Path:
    """Write the tiny model directory described in the module docstring; returns it."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab, merges = _tiny_vocab()
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": False,
        "model_max_length": 2048,
        "chat_template": TINY_CHAT_TEMPLATE,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    model_config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": TINY_VOCAB_SIZE,
        "max_position_embeddings": 2048,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    (directory / "config.json").write_text(json.dumps(model_config, indent=1))
    return directory


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A weightless model directory named "tiny" for `--engine-backend dummy` servers."""
    return write_tiny_tokenizer(tmp_path_factory.mktemp("models") / "tiny")


def dummy_args(model_dir: Path, *extra: str, behaviour: str = "") -> list[str]:
    """Arguments for a dummy-engine server on `model_dir` (fast heartbeats and watchdog)."""
    args = [str(model_dir), "--engine-backend", "dummy", "--watchdog-interval-s", "0.5"]
    if behaviour:
        args += ["--dummy-behaviour", behaviour]
    return [*args, *extra]


@pytest.fixture
def tiny_server(tiny_tokenizer_dir: Path) -> Iterator[RemoteServer]:
    """A healthy dummy-engine server with default settings."""
    with RemoteServer(dummy_args(tiny_tokenizer_dir)) as server:
        yield server
