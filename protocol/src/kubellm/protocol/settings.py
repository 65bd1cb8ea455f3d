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


class ServeSettings(_Settings):
    """Everything `kubellm serve` accepts."""

    engine: EngineSettings = EngineSettings()
    frontend: FrontendSettings = FrontendSettings()

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
        return self
