"""Logging set-up shared by `kubellm serve` and `kubellm-engine`: text or one JSON object a line."""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Literal

LogFormat = Literal["text", "json"]
LOG_FORMAT_ENV = "KUBELLM_LOG_FORMAT"
LOG_LEVEL_ENV = "KUBELLM_LOG_LEVEL"

_TEXT = "%(asctime)s %(levelname)s %(processName)s[%(process)d] %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log collectors."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(fmt: str | None = None, level: str | None = None) -> None:
    """Configure the root logger once for this process.

    The format and level default to $KUBELLM_LOG_FORMAT / $KUBELLM_LOG_LEVEL, so that a child
    process (the engine) inherits the parent's choice through the environment.
    """
    fmt = fmt or os.environ.get(LOG_FORMAT_ENV, "text")
    level = (level or os.environ.get(LOG_LEVEL_ENV, "INFO")).upper()
    if fmt not in ("text", "json"):
        raise ValueError(f"unknown log format {fmt!r} (use text or json)")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(_TEXT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    os.environ[LOG_FORMAT_ENV] = fmt
    os.environ[LOG_LEVEL_ENV] = level
