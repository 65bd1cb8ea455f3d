"""Typed messages exchanged between API servers and engine cores over ZeroMQ.

Every message is a `msgspec.Struct` with a tag, encoded as msgpack. Decoding is closed: a
frame that is not exactly one of these types (unknown tag, missing or extra fields, wrong
types) is rejected by `kubellm.protocol.codec`; nothing is ever unpickled.

Topology (docs/design/0003-scale-out.md): one head with N API servers ("clients"), D engine
cores; every engine talks to every client.

* engine → head registration: the head's coordinator binds a ROUTER; each engine core connects a
  DEALER (routing id `engine_identity(rank, incarnation)`) and repeats `EngineHello` until it
  gets `EngineWelcome` (the clients' addresses) or `EngineRefused`. Afterwards the engine sends
  `Heartbeat`s on that link and the coordinator answers with `HeadBeat`s; an engine that hears
  no `HeadBeat` for its head timeout exits non-zero. `EngineDead` on it says goodbye.
* client → engine: each API server binds a ROUTER ("input") socket; each engine core connects a
  DEALER with the same routing id. The engine's first message on it is `EngineReady` (the
  handshake); the client then sends `AddRequest`, `AbortRequests`, `UtilityRequest` to that
  routing id, `EngineEvicted` to make an engine it no longer trusts exit, and `DrainingAck`.
* engine → client: each API server binds a PULL ("output") socket; each engine core connects a
  PUSH and sends `EngineOutputs` batches, `Heartbeat`s, `UtilityResult`s, `EngineDraining` when
  it is told to stop gracefully, and, before it exits, one `EngineDead`.
* engine → local monitor (headless pods): `EngineStatus` changes and `Heartbeat`s over a PUSH to
  the supervising `kubellm serve --headless` process, which serves /health and /metrics.

`EngineHello` and `EngineRefused` are the version-stable part: their fields never change
meaning and unknown fields are tolerated, so a head and an engine of different protocol
versions can still tell each other why they do not match.
"""

from __future__ import annotations

from typing import Literal

import msgspec

PROTOCOL_VERSION = 3
"""Bumped on any incompatible change of the messages below."""

FinishReason = Literal["stop", "length", "abort", "error"]
"""Why a request ended. "stop": EOS or a stop token id; "length": max_tokens or
max_model_len; "abort": the client cancelled; "error": the engine failed this request only."""


class _Msg(msgspec.Struct, tag=True, forbid_unknown_fields=True, frozen=True):
    """Base for every wire message (tagged by class name)."""


class SamplingParams(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Per-request sampling settings, validated by the API server before they are sent.

    Stop *strings* are handled by the API server's detokenizer (it aborts the engine request
    when one matches); stop *token ids* and EOS are handled by the engine.
    """

    max_tokens: int
    """Number of tokens to generate at most (>= 1)."""
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    top_k: int = 0
    """0 disables top-k."""
    min_p: float = 0.0
    seed: int | None = None
    """Makes sampling reproducible for this request, whatever else is in the batch."""
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    """EOS and stop token ids are suppressed until this many tokens were generated."""
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None
    """None: no logprobs. k >= 0: the sampled token's logprob plus the k most likely."""


class AddRequest(_Msg, frozen=True):
    """Start generating for one sequence (the API server fans `n > 1` out into n requests)."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    arrival_time: float
    """Wall-clock seconds (time.time()) when the API server received the request."""
    client_index: int = 0
    """Which API server sent it (informational: the engine answers on the link it came from)."""


class AbortRequests(_Msg, frozen=True):
    """Stop these requests now and free their KV blocks; unknown ids are ignored."""

    request_ids: tuple[str, ...]


class UtilityRequest(_Msg, frozen=True):
    """Call a named engine utility; answered by `UtilityResult` with the same call_id.

    Known methods: "ping" (→ "pong"), "get_supported_tasks" (→ list[str]),
    "get_stats" (→ SchedulerStats as dict), "reset_prefix_cache" (→ bool).
    """

    call_id: int
    method: str
    args: tuple[str | int | float | bool | None, ...] = ()
    client_index: int = 0


class EngineCompat(msgspec.Struct, frozen=True):
    """What must be equal between a head and each of its engines (checked at registration by
    the coordinator and again by each API server on `EngineReady`). Unknown fields are
    tolerated so that a newer peer's compat still decodes and the mismatch can be named."""

    protocol_version: int
    revision: str
    """"kubellm <version>", plus "/<--deployment-revision>" when one is given."""
    model_digest: str
    """sha256 over the model directory's config and tokenizer files (not the weights)."""
    max_model_len: int | None
    """The --max-model-len setting (None: the model's own limit)."""
    dtype: str
    """The --dtype setting."""
    engine_backend: str
    """The --engine-backend setting."""


class EngineFacts(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """What an engine core tells its clients in the handshake."""

    engine_index: int
    """The engine's data-parallel rank."""
    incarnation: int
    """Random per engine process: tells a restarted engine of the same rank from its
    predecessor (it is part of the ZMQ routing id)."""
    compat: EngineCompat
    model: str
    """The model directory the engine loaded."""
    max_model_len: int
    supported_tasks: tuple[str, ...]
    num_kv_blocks: int
    block_size: int
    max_num_seqs: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    device: str
    dtype: str
    pid: int
    host: str
    """The engine's host name (its pod name in Kubernetes)."""


class EngineReady(_Msg, frozen=True):
    """The handshake: the engine has loaded its model and is ready for requests."""

    facts: EngineFacts


class TokenLogprob(msgspec.Struct, array_like=True, frozen=True):
    token_id: int
    logprob: float


class PositionLogprobs(msgspec.Struct, array_like=True, frozen=True):
    """Logprob of the sampled token at one position, plus the top alternatives (best first)."""

    sampled: TokenLogprob
    top: tuple[TokenLogprob, ...]


class RequestOutput(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """New tokens for one request since its previous output (a delta)."""

    request_id: str
    new_token_ids: tuple[int, ...]
    new_logprobs: tuple[PositionLogprobs, ...] | None = None
    finish_reason: FinishReason | None = None
    stop_token_id: int | None = None
    """The stop token id (from stop_token_ids, not EOS) that ended the request, if any."""
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    """Prompt tokens served from the prefix cache (set on the first output)."""
    error: str | None = None
    """With finish_reason="error": why this one request failed (the engine stays healthy)."""


class SchedulerStats(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    """Fraction of KV blocks in use, 0..1."""
    num_preemptions: int = 0
    """Cumulative count of preemptions since start."""
    prefix_cache_queries: int = 0
    """Cumulative prompt tokens looked up in the prefix cache."""
    prefix_cache_hits: int = 0
    """Cumulative prompt tokens found in the prefix cache."""
    num_steps: int = 0
    """Cumulative engine steps."""


class EngineOutputs(_Msg, frozen=True):
    """One engine step's outputs for the requests of one client."""

    engine_index: int
    incarnation: int
    outputs: tuple[RequestOutput, ...]
    timestamp: float
    """time.time() when the step finished."""
    stats: SchedulerStats | None = None


class Heartbeat(_Msg, frozen=True):
    """Sent by the engine at least every `heartbeat_interval_s`, busy or idle.

    `seconds_since_progress` is how long ago the engine last completed a step while it had
    work (0 when idle), so a client can tell a hung engine from a busy one.
    """

    engine_index: int
    incarnation: int
    timestamp: float
    seconds_since_progress: float
    stats: SchedulerStats


class UtilityResult(_Msg, frozen=True):
    call_id: int
    engine_index: int
    result: str | int | float | bool | list[str] | dict[str, float] | None = None
    error: str | None = None


class EngineDead(_Msg, frozen=True):
    """Sent once to every client (and to the coordinator) just before the engine exits: after
    a fatal error, or `clean=True` when it was told to stop (SIGTERM)."""

    engine_index: int
    incarnation: int
    reason: str
    clean: bool = False


class EngineDraining(_Msg, frozen=True):
    """Engine → client, once, on a graceful stop (SIGTERM to an engine with a drain timeout):
    send me no new request. The engine finishes what it has (and what was sent before the
    client heard), for at most `deadline_s` seconds, then says `EngineDead(clean=True)`."""

    engine_index: int
    incarnation: int
    deadline_s: float
    """How long from now the engine waits at most for its requests to finish."""


class DrainingAck(_Msg, frozen=True):
    """Client → engine, in answer to `EngineDraining`: this API server sends the engine no new
    request. Links are FIFO, so every request the client sent before lies ahead of it."""

    client_index: int = 0


class EngineEvicted(_Msg, frozen=True):
    """Client → engine: this API server no longer accepts the engine (it declared it dead, or
    its facts do not match); the engine logs the reason and exits non-zero, so that Kubernetes
    restarts it and it registers afresh."""

    reason: str


class EngineHello(msgspec.Struct, tag=True, frozen=True):
    """Engine → coordinator: "I am rank `engine_index`"; repeated until answered.
    Version-stable (see the module docstring)."""

    engine_index: int
    incarnation: int
    compat: EngineCompat
    pid: int
    host: str


class ClientAddress(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Where an engine connects for API server (client) `index` of the head."""

    input: str
    """ZMQ address of the client's ROUTER; the engine connects a DEALER."""
    output: str
    """ZMQ address of the client's PULL; the engine connects PUSH sockets."""


class EngineWelcome(_Msg, frozen=True):
    """Coordinator → engine: accepted. `clients[i]` is API server i's addresses."""

    clients: tuple[ClientAddress, ...]
    heartbeat_interval_s: float
    """How often the coordinator sends `HeadBeat`s."""


class EngineRefused(msgspec.Struct, tag=True, frozen=True):
    """Coordinator → engine: not accepted (mismatching compat, rank out of range or held by a
    live engine). The engine logs `reason` and exits non-zero. Version-stable."""

    reason: str


class HeadBeat(_Msg, frozen=True):
    """Coordinator → engine, every `heartbeat_interval_s` after the welcome."""

    timestamp: float


EngineState = Literal["registering", "loading", "ready", "draining", "stopped", "failed"]
""""draining": told to stop gracefully, it finishes its requests and takes no new ones."""


class EngineStatus(_Msg, frozen=True):
    """Engine → its local monitor (the `kubellm serve --headless` supervisor): a state change."""

    engine_index: int
    incarnation: int
    state: EngineState
    detail: str = ""
    timestamp: float = 0.0


ClientToEngine = AddRequest | AbortRequests | UtilityRequest | EngineEvicted | DrainingAck
EngineToClient = (
    EngineReady | EngineOutputs | Heartbeat | UtilityResult | EngineDraining | EngineDead
)
EngineToCoordinator = EngineHello | Heartbeat | EngineDead
CoordinatorToEngine = EngineWelcome | EngineRefused | HeadBeat
EngineToMonitor = EngineStatus | Heartbeat
