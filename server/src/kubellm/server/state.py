"""Per-process server state, stored on `app.state.kubellm` and read by the routers."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kubellm.protocol.messages import EngineFacts
from kubellm.protocol.settings import ServeSettings

if TYPE_CHECKING:
    from kubellm.server.engine_client import EngineClient
    from kubellm.server.stats import StatsSink
    from kubellm.server.tokenizer import Tokenizer


@dataclass
class ServerState:
    settings: ServeSettings
    engine: EngineClient
    tokenizer: Tokenizer
    """From the head's own model directory, so a head with no engine yet can build its app."""
    served_model_names: tuple[str, ...]
    """The first is reported in responses; requests may use any."""
    supported_tasks: tuple[str, ...]
    stats: StatsSink
    chat_template: str | None = None
    """The template in force: --chat-template, else the model's own, else None."""
    start_time: float = field(default_factory=time.time)
    server_load: int = 0
    """Requests being processed now (reported by /load)."""
    draining: bool = False
    """Set on SIGTERM: new requests are refused with 503 while in-flight ones finish."""

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    @property
    def facts(self) -> EngineFacts:
        """The first ready engine's facts; raises `EngineUnavailableError` (HTTP 503) while no
        engine is ready."""
        return self.engine.facts
