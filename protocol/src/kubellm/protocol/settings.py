"""Typed settings: the one place each `kubellm serve` flag is defined.

Flags and environment variables are generated from these models by
`kubellm.protocol.cli` (flag `--max-model-len` ↔ field `max_model_len` ↔ env
`KUBELLM_MAX_MODEL_LEN`); precedence is CLI > environment > default. The docstring under each
field is its help text. The operator (issue 4) renders pod arguments from the same models.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


class EngineSettings(_Settings):
    """What the engine core needs; sent to the engine process as JSON."""

    model: str | None = Field(default=None, json_schema_extra={"positional": True})
    """Model directory (a Hugging Face checkpoint: config.json, *.safetensors, tokenizer files).
    Omit it to serve the embedded default model, SmolLM2-135M-Instruct."""
    max_model_len: int | None = Field(default=None, ge=16)
    """Longest sequence (prompt + output) in tokens; default: the model's own limit."""
    max_num_seqs: int = Field(default=64, ge=1, le=4096)
    """Most sequences running at once in the engine."""
    max_num_batched_tokens: int = Field(default=2048, ge=16)
    """Token budget per engine step; longer prompts are prefilled in chunks of this size."""
    block_size: int = Field(default=16, ge=1, le=1024)
    """Tokens per KV cache block."""
    num_kv_blocks: int | None = Field(default=None, ge=1)
    """KV cache blocks to allocate; default: from --kv-cache-memory-gib (CPU) or free GPU memory."""
    kv_cache_memory_gib: float = Field(default=2.0, gt=0)
    """KV cache size in GiB when --num-kv-blocks is not given (CPU)."""
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    """Fraction of GPU memory the engine may use (weights, activations and KV cache)."""
    enable_prefix_caching: bool = True
    """Reuse KV blocks of identical prompt prefixes across requests."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weight and activation dtype; "auto" is float32 on CPU and bfloat16 on GPU."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the model runs; "auto" picks CUDA when available."""
    seed: int = 0
    """Seed of the engine's random generator (requests with their own seed ignore it)."""
    enforce_eager: bool = False
    """Disable CUDA graphs (GPU only)."""
    async_scheduling: bool = True
    """Schedule and launch the next decode step while the GPU still runs the current one (its
    input tokens are taken from the GPU); steps that need penalties or admit new requests run
    synchronously. Off: every step waits for the previous step's tokens."""
    attention_backend: Literal["auto", "torch", "triton"] = "auto"
    """Paged attention implementation: "triton" (our Triton kernels for the KV-cache writes and
    decode attention; CUDA only), "torch" (SDPA), or "auto" (triton on CUDA when it imports)."""
    fused_kernels: bool = True
    """With the triton backend: run RMSNorm (+ residual add), q/k norm + RoPE + the K/V store,
    and SiLU-and-mul as fused Triton kernels, one launch each (off: plain torch ops)."""
    heartbeat_interval_s: float = Field(default=1.0, gt=0, le=60)
    """How often the engine core reports that it is alive."""
    engine_backend: Literal["model", "dummy"] = "model"
    """"dummy" runs no model: it emits scripted tokens fast (tests and front-end benchmarks)."""
    dummy_behaviour: str = ""
    """For --engine-backend dummy: comma-separated faults such as "crash_after_tokens=3",
    "hang_after_tokens=3", "startup_delay_s=5", "token_delay_s=0.01", "fail_prefix=bad-"."""


class FrontendSettings(_Settings):
    """HTTP server settings (mirrors vLLM's frontend flags where vLLM has them)."""

    host: str | None = None
    """Address to listen on; default: all interfaces. IPv6 addresses are accepted."""
    port: int = Field(default=8000, ge=0, le=65535)
    """TCP port to listen on (0 picks a free one and logs it)."""
    uds: str | None = None
    """Listen on this UNIX domain socket path instead of host:port."""
    served_model_name: tuple[str, ...] = ()
    """Model name(s) clients use in requests; the first is reported in responses. Default: the
    model directory's name."""
    api_key: tuple[str, ...] = Field(default=(), repr=False)
    """Require one of these keys as a Bearer token on the OpenAI routes (/v1/*, /tokenize,
    /detokenize, /load). Env: KUBELLM_API_KEY (comma-separated)."""
    allowed_origins: tuple[str, ...] = ("*",)
    """CORS allowed origins."""
    allowed_methods: tuple[str, ...] = ("*",)
    """CORS allowed methods."""
    allowed_headers: tuple[str, ...] = ("*",)
    """CORS allowed headers."""
    allow_credentials: bool = False
    """CORS: allow credentials."""
    enable_request_id_headers: bool = False
    """Echo (or create) an X-Request-Id header on every response."""
    middleware: tuple[str, ...] = ()
    """Extra ASGI middleware as import paths "module:attribute" (a class or a
    function(request, call_next)), applied in order."""
    root_path: str = ""
    """ASGI root path, when served behind a path-based proxy."""
    disable_fastapi_docs: bool = False
    """Disable /docs, /redoc and /openapi.json."""
    uvicorn_log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = "info"
    """uvicorn's log level."""
    disable_uvicorn_access_log: bool = False
    """Do not log each HTTP request."""
    ssl_keyfile: str | None = None
    """TLS private key file."""
    ssl_certfile: str | None = None
    """TLS certificate file."""
    ssl_ca_certs: str | None = None
    """CA certificates file (for client certificate checks)."""
    ssl_cert_reqs: int = Field(default=0, ge=0, le=2)
    """Whether client certificates are required (ssl.CERT_NONE=0, OPTIONAL=1, REQUIRED=2)."""
    chat_template: str | None = None
    """A Jinja chat template, as a file path or inline text; default: the model's own."""
    response_role: str = "assistant"
    """Role of generated messages when the request's last message does not ask for another."""
    max_log_len: int | None = Field(default=None, ge=0)
    """Longest prompt text / token list printed in request logs (default: unlimited)."""
    enable_log_requests: bool = False
    """Log each request's prompt and sampling settings."""
    shutdown_timeout: float = Field(default=0.0, ge=0)
    """On SIGTERM/SIGINT: stop admitting requests and let in-flight ones finish for up to this
    many seconds (0: abort them at once), then shut the engine down."""
    engine_ready_timeout_s: float = Field(default=600.0, gt=0)
    """How long to wait for the engine to load its model before giving up."""
    engine_heartbeat_timeout_s: float = Field(default=15.0, gt=0)
    """The engine is declared dead when no heartbeat arrives for this long."""
    engine_progress_timeout_s: float = Field(default=300.0, gt=0)
    """The engine is declared dead when it has work but completes no step for this long."""
    watchdog_interval_s: float = Field(default=1.0, gt=0)
    """How often the watchdog checks the engine; the process exits non-zero soon after the
    engine dies unless KUBELLM_KEEP_ALIVE_ON_ENGINE_DEATH=1."""
    max_request_body_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    """Requests with a larger body get 413."""
    max_header_bytes: int = Field(default=64 * 1024, ge=1024)
    """Largest request header block; larger ones get 431 whatever HTTP implementation runs."""
    max_header_count: int = Field(default=100, ge=8)
    """Most request headers; more get 431."""
    max_n: int = Field(default=64, ge=1)
    """Largest `n` (choices per request) accepted."""
    max_logprobs: int = Field(default=20, ge=0)
    """Largest `logprobs` / `top_logprobs` accepted."""
    timeout_keep_alive: float = Field(default=5.0, gt=0)
    """Seconds an idle keep-alive HTTP connection stays open."""
    log_format: Literal["text", "json"] = "text"
    """Log line format."""


class ParallelSettings(_Settings):
    """Scale-out: API server processes, data-parallel engines and headless engine hosts
    (vLLM's flag names and meanings; see docs/design/0003-scale-out.md)."""

    api_server_count: int | None = Field(default=None, ge=0, le=64)
    """API server processes on this host, sharing the HTTP socket; each talks to every engine.
    Default: --data-parallel-size (0 with --headless)."""
    headless: bool = False
    """Run engine cores only, no API server: they register with the head at
    --data-parallel-address:--data-parallel-rpc-port. /health, /ping and /metrics for the
    engines are served on --host:--port."""
    data_parallel_size: int = Field(default=1, ge=1, le=1024)
    """Engine cores in the whole deployment (ranks 0..size-1)."""
    data_parallel_size_local: int | None = Field(default=None, ge=0, le=1024)
    """Engine cores on this host (ranks start-rank..start-rank+local-1). Default: all of
    --data-parallel-size. A head with 0 runs API servers only and waits for engines to dial in."""
    data_parallel_start_rank: int = Field(default=0, ge=0)
    """Rank of the first engine core on this host (headless hosts; a head starts at 0)."""
    data_parallel_address: str = "127.0.0.1"
    """The head's address: the head binds its engine sockets on it (a host name is resolved to
    a local IP) and headless engines dial it. Never a wildcard address."""
    data_parallel_rpc_port: int = Field(default=29550, ge=1, le=65535 - 2 * 64)
    """The head's registration port; API server i takes the two ports after it: port+1+2i
    (requests) and port+2+2i (outputs). Used when engines run on other hosts."""
    min_ready_engines: int | None = Field(default=None, ge=1)
    """The head is ready (/ready answers 200) while at least this many engines are ready.
    Default: --data-parallel-size."""
    head_timeout_s: float = Field(default=30.0, gt=0)
    """A headless engine exits non-zero when it has heard nothing from the head for this long."""
    registration_timeout_s: float = Field(default=600.0, gt=0)
    """A headless engine exits non-zero when no head accepts it within this long."""
    deployment_revision: str = ""
    """A revision string (e.g. the operator's hash of the spec): a head refuses engines whose
    revision differs from its own."""
    zmq_curve_dir: str | None = None
    """Directory of CURVE key files (e.g. a mounted Secret; `kubellm zmq-keys DIR` makes them):
    engine links are then authenticated and encrypted. The head needs head.key_secret and
    engine.key; engines need engine.key_secret and head.key."""

    @property
    def local_engines(self) -> int:
        """Engine cores on this host."""
        if self.data_parallel_size_local is not None:
            return self.data_parallel_size_local
        return self.data_parallel_size - self.data_parallel_start_rank

    @property
    def api_servers(self) -> int:
        """API server processes on this host."""
        if self.api_server_count is not None:
            return self.api_server_count
        return 0 if self.headless else self.data_parallel_size

    @property
    def required_engines(self) -> int:
        """Engines that must be ready for the head to be ready."""
        return self.min_ready_engines or self.data_parallel_size

    @property
    def remote_engines(self) -> bool:
        """Whether engines on other hosts take part (engine links then use TCP)."""
        return self.headless or self.local_engines < self.data_parallel_size

    def check(self) -> None:
        """Raise ValueError naming the flags of an incoherent combination."""
        size, start, local = (
            self.data_parallel_size,
            self.data_parallel_start_rank,
            self.local_engines,
        )
        if self.headless and self.api_server_count:
            raise ValueError(
                "--headless runs no API server: drop --api-server-count "
                f"{self.api_server_count} (or run the head without --headless)"
            )
        if not self.headless and self.api_server_count == 0:
            raise ValueError("--api-server-count 0 is only valid with --headless")
        if start >= size:
            raise ValueError(
                f"--data-parallel-start-rank {start} is beyond --data-parallel-size {size} "
                f"(ranks are 0..{size - 1})"
            )
        if start + local > size:
            raise ValueError(
                f"--data-parallel-start-rank {start} with --data-parallel-size-local {local} "
                f"needs ranks up to {start + local - 1}, beyond --data-parallel-size {size}"
            )
        if self.headless and local == 0:
            raise ValueError("--headless with --data-parallel-size-local 0 runs nothing")
        if not self.headless and start != 0:
            raise ValueError(
                "only --headless hosts take a --data-parallel-start-rank; the head starts at 0"
            )
        if self.min_ready_engines is not None and self.min_ready_engines > size:
            raise ValueError(
                f"--min-ready-engines {self.min_ready_engines} is more than "
                f"--data-parallel-size {size}"
            )
        if self.data_parallel_address.strip("[]") in {"0.0.0.0", "::", "*", ""}:
            raise ValueError(
                "--data-parallel-address must name the head's own address, not a wildcard"
            )


class ServeSettings(_Settings):
    """Everything `kubellm serve` accepts."""

    engine: EngineSettings = EngineSettings()
    frontend: FrontendSettings = FrontendSettings()
    parallel: ParallelSettings = ParallelSettings()

    @model_validator(mode="after")
    def _coherent(self) -> ServeSettings:
        f = self.frontend
        if f.uds and f.host:
            raise ValueError("--uds and --host are mutually exclusive")
        if bool(f.ssl_keyfile) != bool(f.ssl_certfile):
            raise ValueError("--ssl-keyfile and --ssl-certfile must be given together")
        if f.uds and (f.ssl_keyfile or f.ssl_certfile):
            raise ValueError("TLS is not supported on --uds sockets")
        e = self.engine
        if e.max_model_len is not None and e.max_num_batched_tokens < e.block_size:
            raise ValueError("--max-num-batched-tokens must be at least --block-size")
        if e.dummy_behaviour and e.engine_backend != "dummy":
            raise ValueError("--dummy-behaviour requires --engine-backend dummy")
        self.parallel.check()
        return self
