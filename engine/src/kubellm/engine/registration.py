"""An engine core's registration with the head's coordinator (docs/design/0003-scale-out.md).

The engine repeats `EngineHello` every `HELLO_RETRY_S` on its coordinator DEALER until the
coordinator answers `EngineWelcome` or `EngineRefused`, for at most the registration timeout.
The DEALER has ZMQ_IMMEDIATE set, so that Hellos are only queued on a completed connection (a
head that is not up yet, or whose CURVE handshake fails, does not collect a backlog of them).
"""

from __future__ import annotations

import logging
import time

import zmq

from kubellm.engine.transport import HELLO_RETRY_S, EngineCoreConfig
from kubellm.protocol.codec import BadFrame, Decoder, coordinator_to_engine_decoder, encode
from kubellm.protocol.messages import (
    CoordinatorToEngine,
    EngineHello,
    EngineRefused,
    EngineWelcome,
)

logger = logging.getLogger(__name__)


class RegistrationFailed(Exception):
    """No head accepted this engine; the message says why (already logged at ERROR)."""


def register(
    sock: zmq.Socket[bytes], config: EngineCoreConfig, hello: EngineHello
) -> EngineWelcome:
    """Say Hello until welcomed; raises RegistrationFailed on a refusal or the timeout."""
    address, timeout = config.coordinator_address, config.registration_timeout_s
    decoder = coordinator_to_engine_decoder()
    frame = encode(hello)
    deadline = time.monotonic() + timeout
    next_hello, pending = 0.0, True
    while (now := time.monotonic()) < deadline:
        if pending or now >= next_hello:
            next_hello = now + HELLO_RETRY_S
            try:
                sock.send(frame, zmq.NOBLOCK)
                pending = False
            except zmq.Again:  # no connection yet: send as soon as there is one
                pending = True
        events = zmq.POLLIN | (zmq.POLLOUT if pending else 0)
        wait_ms = max(1, int((min(deadline, next_hello) - now) * 1000))
        if not sock.poll(wait_ms, events) & zmq.POLLIN:
            continue
        answer = _receive(sock, decoder)
        if isinstance(answer, EngineWelcome):
            return answer
        if isinstance(answer, EngineRefused):
            message = f"the head at {address} refused engine {config.engine_index}: "
            message += answer.reason
            logger.error("%s", message)
            raise RegistrationFailed(message)
    message = f"no head at {address} accepted this engine within {timeout:g} s"
    logger.error("%s", message)
    raise RegistrationFailed(message)


def _receive(
    sock: zmq.Socket[bytes], decoder: Decoder[CoordinatorToEngine]
) -> EngineWelcome | EngineRefused | None:
    """The next Welcome or Refused waiting on the link, if any; drops anything else."""
    while True:
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return None
        if len(frames) != 1:
            logger.warning("dropped a head message of %d frames (expected 1)", len(frames))
            continue
        try:
            msg = decoder.decode(frames[0])
        except BadFrame as e:
            logger.warning("dropped a bad frame of %d bytes from the head: %s", len(frames[0]), e)
            continue
        if isinstance(msg, EngineWelcome | EngineRefused):
            return msg
