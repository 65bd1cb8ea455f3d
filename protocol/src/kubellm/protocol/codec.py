"""Encode and decode wire messages: typed msgpack only, size-bounded, never pickle."""

from __future__ import annotations

from typing import Generic, TypeVar

import msgspec

from kubellm.protocol.messages import (
    ClientToEngine,
    CoordinatorToEngine,
    EngineToClient,
    EngineToCoordinator,
    EngineToMonitor,
)

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""Largest frame accepted (also set as ZMQ_MAXMSGSIZE on receiving sockets)."""

T = TypeVar("T")


class BadFrame(ValueError):
    """A received frame is not a valid message; it is dropped and logged, never executed."""


class Decoder(Generic[T]):
    def __init__(self, message_type: type[T], max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        self._decoder = msgspec.msgpack.Decoder(message_type)
        self._max_bytes = max_bytes

    def decode(self, frame: bytes | memoryview) -> T:
        if len(frame) > self._max_bytes:
            raise BadFrame(f"frame of {len(frame)} bytes exceeds the {self._max_bytes} byte limit")
        try:
            return self._decoder.decode(frame)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise BadFrame(f"invalid frame: {e}") from e


_encoder = msgspec.msgpack.Encoder()


def encode(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)


def client_to_engine_decoder(max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Decoder[ClientToEngine]:
    return Decoder(ClientToEngine, max_bytes)  # type: ignore[arg-type]


def engine_to_client_decoder(max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Decoder[EngineToClient]:
    return Decoder(EngineToClient, max_bytes)  # type: ignore[arg-type]


def engine_to_coordinator_decoder(
    max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> Decoder[EngineToCoordinator]:
    return Decoder(EngineToCoordinator, max_bytes)  # type: ignore[arg-type]


def coordinator_to_engine_decoder(
    max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> Decoder[CoordinatorToEngine]:
    return Decoder(CoordinatorToEngine, max_bytes)  # type: ignore[arg-type]


def engine_to_monitor_decoder(
    max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> Decoder[EngineToMonitor]:
    return Decoder(EngineToMonitor, max_bytes)  # type: ignore[arg-type]
