"""Wire messages round-trip exactly; anything else is refused before it is used."""

from __future__ import annotations

import msgspec
import pytest

from kubellm.protocol import codec
from kubellm.protocol.messages import (
    PROTOCOL_VERSION,
    AbortRequests,
    AddRequest,
    ClientAddress,
    EngineCompat,
    EngineDead,
    EngineEvicted,
    EngineFacts,
    EngineHello,
    EngineOutputs,
    EngineReady,
    EngineRefused,
    EngineStatus,
    EngineWelcome,
    HeadBeat,
    Heartbeat,
    PositionLogprobs,
    RequestOutput,
    SamplingParams,
    SchedulerStats,
    TokenLogprob,
    UtilityRequest,
    UtilityResult,
)

COMPAT = EngineCompat(
    protocol_version=PROTOCOL_VERSION,
    revision="kubellm 0.1.0",
    model_digest="abc",
    max_model_len=None,
    dtype="auto",
    engine_backend="model",
)
FACTS = EngineFacts(
    engine_index=0,
    incarnation=2**63 - 1,
    compat=COMPAT,
    model="/m",
    max_model_len=2048,
    supported_tasks=("generate",),
    num_kv_blocks=100,
    block_size=16,
    max_num_seqs=8,
    vocab_size=1000,
    eos_token_ids=(2,),
    device="cpu",
    dtype="float32",
    pid=123,
    host="engine-0",
)

CLIENT_MESSAGES = [
    AddRequest(
        request_id="r1",
        prompt_token_ids=(1, 2, 3),
        sampling=SamplingParams(max_tokens=5, temperature=0.5, stop_token_ids=(7,), logprobs=2),
        arrival_time=12.5,
    ),
    AbortRequests(request_ids=("a", "b")),
    UtilityRequest(call_id=3, method="ping", args=(1, "x", None)),
    EngineEvicted(reason="declared dead"),
]
ENGINE_MESSAGES = [
    EngineReady(facts=FACTS),
    EngineOutputs(
        engine_index=0,
        incarnation=7,
        outputs=(
            RequestOutput(
                request_id="r1",
                new_token_ids=(5,),
                new_logprobs=(PositionLogprobs(TokenLogprob(5, -0.1), (TokenLogprob(5, -0.1),)),),
                finish_reason="length",
                num_prompt_tokens=3,
            ),
        ),
        timestamp=1.0,
        stats=SchedulerStats(num_running=1),
    ),
    Heartbeat(
        engine_index=0,
        incarnation=7,
        timestamp=2.0,
        seconds_since_progress=0.0,
        stats=SchedulerStats(),
    ),
    UtilityResult(call_id=3, engine_index=0, result=["generate"]),
    EngineDead(engine_index=0, incarnation=7, reason="boom"),
    EngineDead(engine_index=0, incarnation=7, reason="stopped (SIGTERM)", clean=True),
]
HELLO = EngineHello(engine_index=1, incarnation=9, compat=COMPAT, pid=4, host="engine-1")
COORDINATOR_MESSAGES = [
    EngineWelcome(
        clients=(ClientAddress(input="tcp://head:29551", output="tcp://head:29552"),),
        heartbeat_interval_s=1.0,
    ),
    EngineRefused(reason="model_digest: head 'a', engine 'b'"),
    HeadBeat(timestamp=3.0),
]


@pytest.mark.parametrize("message", CLIENT_MESSAGES, ids=lambda m: type(m).__name__)
def test_client_messages_round_trip(message: msgspec.Struct) -> None:
    assert codec.client_to_engine_decoder().decode(codec.encode(message)) == message


@pytest.mark.parametrize("message", ENGINE_MESSAGES, ids=lambda m: type(m).__name__)
def test_engine_messages_round_trip(message: msgspec.Struct) -> None:
    assert codec.engine_to_client_decoder().decode(codec.encode(message)) == message


def test_direction_is_enforced() -> None:
    """An engine message is not a valid client message and vice versa."""
    with pytest.raises(codec.BadFrame):
        codec.client_to_engine_decoder().decode(codec.encode(ENGINE_MESSAGES[0]))
    with pytest.raises(codec.BadFrame):
        codec.engine_to_client_decoder().decode(codec.encode(CLIENT_MESSAGES[0]))


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\x80\x04\x95",  # the start of a pickle stream
        msgspec.msgpack.encode({"type": "Unknown"}),
        msgspec.msgpack.encode({"type": "AbortRequests", "request_ids": [1, 2]}),
        msgspec.msgpack.encode({"type": "AbortRequests", "request_ids": [], "extra": 1}),
        msgspec.msgpack.encode({"type": "AbortRequests"}),
    ],
    ids=["empty", "pickle", "unknown-tag", "wrong-type", "extra-field", "missing-field"],
)
def test_bad_frames_are_refused(frame: bytes) -> None:
    with pytest.raises(codec.BadFrame):
        codec.client_to_engine_decoder().decode(frame)


def test_oversized_frame_is_refused_before_decoding() -> None:
    frame = codec.encode(AbortRequests(request_ids=("x" * 2000,)))
    with pytest.raises(codec.BadFrame, match="exceeds"):
        codec.client_to_engine_decoder(max_bytes=1000).decode(frame)


@pytest.mark.parametrize("message", COORDINATOR_MESSAGES, ids=lambda m: type(m).__name__)
def test_coordinator_messages_round_trip(message: msgspec.Struct) -> None:
    assert codec.coordinator_to_engine_decoder().decode(codec.encode(message)) == message


def test_engine_to_coordinator_and_monitor_round_trip() -> None:
    to_coordinator = codec.engine_to_coordinator_decoder()
    assert to_coordinator.decode(codec.encode(HELLO)) == HELLO
    beat = ENGINE_MESSAGES[2]
    assert to_coordinator.decode(codec.encode(beat)) == beat
    status = EngineStatus(engine_index=1, incarnation=9, state="failed", detail="refused")
    assert codec.engine_to_monitor_decoder().decode(codec.encode(status)) == status


def test_hello_from_a_newer_protocol_still_decodes_so_the_mismatch_can_be_named() -> None:
    newer = msgspec.to_builtins(HELLO)
    newer["compat"]["protocol_version"] = PROTOCOL_VERSION + 1
    newer["compat"]["kv_layout"] = "new-field"
    newer["features"] = ["something new"]
    decoded = codec.engine_to_coordinator_decoder().decode(msgspec.msgpack.encode(newer))
    assert isinstance(decoded, EngineHello)
    assert decoded.compat.protocol_version == PROTOCOL_VERSION + 1


def test_refusal_from_a_newer_protocol_still_decodes() -> None:
    raw = msgspec.msgpack.encode({"type": "EngineRefused", "reason": "no", "hint": "upgrade"})
    decoded = codec.coordinator_to_engine_decoder().decode(raw)
    assert decoded == EngineRefused(reason="no")


def test_engine_does_not_accept_coordinator_messages_on_a_client_link() -> None:
    with pytest.raises(codec.BadFrame):
        codec.client_to_engine_decoder().decode(codec.encode(HeadBeat(timestamp=1.0)))
