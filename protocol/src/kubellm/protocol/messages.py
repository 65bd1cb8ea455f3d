"""Typed messages exchanged between API servers and engine cores over ZeroMQ.

Every message is a `msgspec.Struct` with a tag, encoded as msgpack. Decoding is closed: a
frame that is not exactly one of these types (unknown tag, missing or extra fields, wrong
types) is rejected by `kubellm.protocol.codec`; nothing is ever unpickled.

Topology (one engine core, one API server; issue 3 generalises the counts):

* client → engine: the API server binds a ROUTER ("input") socket; each engine core connects
  a DEALER whose routing id is its engine index (2 bytes, little endian). The engine's first
  message on it is `EngineReady` (the handshake); the client then sends `AddRequest`,
  `AbortRequests`, `UtilityRequest` to that routing id.
* engine → client: the API server binds a PULL ("output") socket; each engine core connects a
  PUSH and sends `EngineOutputs` batches, `Heartbeat`s, `UtilityResult`s and, before it dies
  of a fatal error, one `EngineDead`.
"""

from __future__ import annotations

from typing import Literal

import msgspec

PROTOCOL_VERSION = 1
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
    """Which API server sent it (issue 3: several API servers per engine)."""


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


class EngineFacts(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """What an engine core tells its clients in the handshake."""

    engine_index: int
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
    protocol_version: int = PROTOCOL_VERSION
    revision: str = ""
    """Free-form build/config revision; issue 3 makes heads refuse mismatching engines."""


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
    timestamp: float
    seconds_since_progress: float
    stats: SchedulerStats


class UtilityResult(_Msg, frozen=True):
    call_id: int
    engine_index: int
    result: str | int | float | bool | list[str] | dict[str, float] | None = None
    error: str | None = None


class EngineDead(_Msg, frozen=True):
    """Sent once when the engine hits a fatal error, just before it exits non-zero."""

    engine_index: int
    reason: str


ClientToEngine = AddRequest | AbortRequests | UtilityRequest
EngineToClient = EngineReady | EngineOutputs | Heartbeat | UtilityResult | EngineDead
