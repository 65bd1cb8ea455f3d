"""Wire messages round-trip exactly; anything else is refused before it is used."""

from __future__ import annotations

import msgspec
import pytest

from kubellm.protocol import codec
from kubellm.protocol.messages import (
    AbortRequests,
    AddRequest,
    EngineDead,
    EngineFacts,
    EngineOutputs,
    EngineReady,
    Heartbeat,
    PositionLogprobs,
    RequestOutput,
    SamplingParams,
    SchedulerStats,
    TokenLogprob,
    UtilityRequest,
    UtilityResult,
)

FACTS = EngineFacts(
    engine_index=0,
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
]
ENGINE_MESSAGES = [
    EngineReady(facts=FACTS),
    EngineOutputs(
        engine_index=0,
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
    Heartbeat(engine_index=0, timestamp=2.0, seconds_since_progress=0.0, stats=SchedulerStats()),
    UtilityResult(call_id=3, engine_index=0, result=["generate"]),
    EngineDead(engine_index=0, reason="boom"),
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
