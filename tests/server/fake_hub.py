"""A fake Hugging Face hub for `kubellm fetch-model` tests: a threaded http.server that answers
the requests huggingface_hub 2.x makes for a download into a local directory:

- GET  /api/models/{org}/{name}/revision/{rev}?blobs=True  (model info: commit sha, files, sizes)
- HEAD /{org}/{name}/resolve/{rev}/{path}  (X-Repo-Commit, ETag, Content-Length)
- GET  /{org}/{name}/resolve/{rev}/{path}  (the bytes; honours `Range: bytes=N-`)

Errors carry the hub's X-Error-Code headers (RepoNotFound, RevisionNotFound, EntryNotFound,
GatedRepo) so that huggingface_hub raises its specific exceptions. Every request is recorded.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import unquote, urlsplit


@dataclass
class FakeRepo:
    files: dict[str, bytes]
    sha: str = "0123456789abcdef0123456789abcdef01234567"
    branches: tuple[str, ...] = ("main",)
    token: str | None = None  # set: a gated repo that only this bearer token can read

    def commit_for(self, revision: str) -> str | None:
        return self.sha if revision == self.sha or revision in self.branches else None


@dataclass
class FakeHub:
    repos: dict[str, FakeRepo]
    requests: list[str] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the fake hub is not running")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(_HubHandler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = None
        self._thread = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class _HubHandler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base signature)
        """Quiet: the test output should not list every request."""

    def do_GET(self) -> None:
        self._route(send_body=True)

    def do_HEAD(self) -> None:
        self._route(send_body=False)

    def _route(self, *, send_body: bool) -> None:
        self.fake.requests.append(f"{self.command} {self.path}")
        parts = [unquote(p) for p in urlsplit(self.path).path.strip("/").split("/")]
        if parts[:2] == ["api", "models"] and len(parts) == 6 and parts[4] == "revision":
            self._model_info(f"{parts[2]}/{parts[3]}", parts[5])
        elif len(parts) >= 5 and parts[2] == "resolve":
            self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), send_body)
        else:
            self._error(404, "EntryNotFound", "no such route")

    def _repo(self, repo_id: str, revision: str) -> tuple[FakeRepo, str] | None:
        """The repo and the commit, or None after sending the hub's error."""
        repo = self.fake.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return None
        if repo.token is not None:
            auth = self.headers.get("Authorization")
            if auth != f"Bearer {repo.token}":
                status = 401 if auth is None else 403
                self._error(status, "GatedRepo", f"Access to model {repo_id} is restricted")
                return None
        sha = repo.commit_for(revision)
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return None
        return repo, sha

    def _model_info(self, repo_id: str, revision: str) -> None:
        found = self._repo(repo_id, revision)
        if found is None:
            return
        repo, sha = found
        siblings = [
            {"rfilename": name, "size": len(data), "blobId": _etag(data)}
            for name, data in sorted(repo.files.items())
        ]
        body = json.dumps({"id": repo_id, "sha": sha, "siblings": siblings}).encode()
        self._send(200, body, {"Content-Type": "application/json"}, send_body=True)

    def _resolve(self, repo_id: str, revision: str, path: str, send_body: bool) -> None:
        found = self._repo(repo_id, revision)
        if found is None:
            return
        repo, sha = found
        data = repo.files.get(path)
        if data is None:
            self._error(404, "EntryNotFound", f"{path} does not exist", sha=sha)
            return
        headers = {"X-Repo-Commit": sha, "ETag": f'"{_etag(data)}"', "Accept-Ranges": "bytes"}
        status, body = 200, data
        requested = self.headers.get("Range", "")
        if requested.startswith("bytes=") and requested.endswith("-"):
            start = int(requested[len("bytes=") : -1])
            status, body = 206, data[start:]
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        self._send(status, body, headers, send_body=send_body)

    def _error(self, status: int, code: str, message: str, sha: str | None = None) -> None:
        headers = {"X-Error-Code": code, "X-Error-Message": message}
        if sha is not None:
            headers["X-Repo-Commit"] = sha
        body = json.dumps({"error": message}).encode()
        self._send(status, body, {**headers, "Content-Type": "application/json"}, send_body=True)

    def _send(self, status: int, body: bytes, headers: dict[str, str], *, send_body: bool) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body and self.command != "HEAD":
            self.wfile.write(body)


def _etag(data: bytes) -> str:
    return hashlib.sha1(data, usedforsecurity=False).hexdigest()


# ---- a tiny checkpoint, made without torch or transformers --------------------------------

HIDDEN, INTER, HEADS, KV_HEADS, VOCAB = 32, 48, 4, 2, 64
TINY_CONFIG: dict[str, object] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": HIDDEN,
    "intermediate_size": INTER,
    "num_hidden_layers": 1,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "vocab_size": VOCAB,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}


def tiny_llama_files(seed: int = 0) -> dict[str, bytes]:
    """A tiny random Llama checkpoint (tied embeddings) plus small tokenizer files."""
    import numpy as np
    from safetensors.numpy import save

    hidden, inter, heads, kv, vocab = HIDDEN, INTER, HEADS, KV_HEADS, VOCAB
    head_dim = hidden // heads
    shapes = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
        "model.layers.0.input_layernorm.weight": (hidden,),
        "model.layers.0.post_attention_layernorm.weight": (hidden,),
        "model.layers.0.self_attn.q_proj.weight": (heads * head_dim, hidden),
        "model.layers.0.self_attn.k_proj.weight": (kv * head_dim, hidden),
        "model.layers.0.self_attn.v_proj.weight": (kv * head_dim, hidden),
        "model.layers.0.self_attn.o_proj.weight": (hidden, heads * head_dim),
        "model.layers.0.mlp.gate_proj.weight": (inter, hidden),
        "model.layers.0.mlp.up_proj.weight": (inter, hidden),
        "model.layers.0.mlp.down_proj.weight": (hidden, inter),
    }
    rng = np.random.default_rng(seed)
    tensors = {k: (0.1 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
    vocab_map = {f"t{i}": i for i in range(vocab)}
    tokenizer = {"version": "1.0", "model": {"type": "WordLevel", "vocab": vocab_map}}
    tokenizer_config = {"chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}
    return {
        "config.json": json.dumps(TINY_CONFIG).encode(),
        "generation_config.json": json.dumps({"eos_token_id": 2}).encode(),
        "model.safetensors": save(tensors),
        "tokenizer.json": json.dumps(tokenizer).encode(),
        "tokenizer_config.json": json.dumps(tokenizer_config).encode(),
    }
