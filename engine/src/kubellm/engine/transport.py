"""What both ends of the engine-core ZeroMQ link agree on: the start-up config and socket options.

Torch-free and free of lazy imports of torch modules, so that the API server may import it
(`kubellm.engine.core` lazily imports the model backend, which the server must never reach).
"""

from __future__ import annotations

from typing import Any

import zmq
from pydantic import BaseModel, ConfigDict, Field

from kubellm.protocol.codec import DEFAULT_MAX_MESSAGE_BYTES
from kubellm.protocol.settings import EngineSettings

INPUT_HWM = 10_000
"""High-water mark (messages) of the client → engine direction; finite, so memory is bounded."""
OUTPUT_HWM = 100_000
"""High-water mark (messages) of the engine → client direction."""
ENGINE_LINGER_MS = 3_000
"""How long an exiting engine keeps trying to deliver its last frames (e.g. EngineDead)."""


class EngineCoreConfig(BaseModel):
    """Everything an engine-core process needs; passed as JSON in `kubellm-engine --config-json`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    settings: EngineSettings
    """The engine settings of `kubellm serve`."""
    input_address: str
    """ZMQ address of the client's ROUTER socket; the engine connects a DEALER to it."""
    output_address: str
    """ZMQ address of the client's PULL socket; the engine connects PUSH sockets to it."""
    engine_index: int = Field(default=0, ge=0, lt=2**16)
    """This engine's index; its DEALER routing id is the index as 2 little-endian bytes."""
    parent_pid: int | None = None
    """The process that spawned the engine; the engine exits soon after it disappears."""


def engine_identity(engine_index: int) -> bytes:
    """The DEALER routing id of engine `engine_index`."""
    return engine_index.to_bytes(2, "little")


def set_socket_options(
    sock: zmq.Socket[Any],
    *,
    receives: bool,
    hwm: int,
    linger_ms: int,
    max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> None:
    """Bound a socket (sync or asyncio): finite high-water marks, a linger, and MAXMSGSIZE
    where it receives, so that an oversized frame is refused by ZeroMQ before it is read."""
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.LINGER, linger_ms)
    if receives:
        sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)
