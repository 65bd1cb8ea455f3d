"""`kubellm-engine`: the EngineCore process entry point, spawned by `kubellm serve` (the head
or a `--headless` supervisor).

Usage: `kubellm-engine --config-json '{"settings": {...}, "coordinator_address": ..., ...}'`.
Exit codes: 0 after SIGTERM/SIGINT or the parent's death; 1 on failure, refusal, eviction, head
loss or registration timeout; 2 for an invalid --config-json.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from pydantic import ValidationError

from kubellm.engine.core import run_engine_core
from kubellm.engine.transport import EngineCoreConfig
from kubellm.protocol.logs import configure_logging

logger = logging.getLogger("kubellm.engine.cli")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubellm-engine",
        description="kubellm EngineCore process, started by `kubellm serve` (a head or a --headless "
        "host), not by hand. It registers with the head at coordinator_address and serves "
        "every API server the head names.",
    )
    parser.add_argument(
        "--config-json",
        required=True,
        help="EngineCoreConfig as JSON: settings, coordinator_address (required), engine_index, "
        "parent_pid, revision, head_timeout_s, registration_timeout_s, curve_dir, "
        "monitor_address.",
    )
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
        help="Log line format [env: KUBELLM_LOG_FORMAT, inherited from `kubellm serve`]",
    )
    parser.add_argument(
        "--log-level",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper,
        help="Log level [env: KUBELLM_LOG_LEVEL, inherited from `kubellm serve`]",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        configure_logging(args.log_format, args.log_level)
    except ValueError as e:  # a bad $KUBELLM_LOG_FORMAT / $KUBELLM_LOG_LEVEL
        parser.error(str(e))
    try:
        config = EngineCoreConfig.model_validate_json(args.config_json)
    except ValidationError as e:
        logger.error("invalid --config-json: %s", e)
        return 2
    return run_engine_core(config)


if __name__ == "__main__":
    raise SystemExit(main())
