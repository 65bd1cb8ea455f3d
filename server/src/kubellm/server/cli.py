"""The `kubellm` command: `kubellm serve [MODEL] [flags]` and `kubellm --version`.

The serve flags are generated from `ServeSettings` (one flag per field, help text from the
field docstrings, env KUBELLM_<FIELD>); precedence is CLI > environment > default.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import cast

from kubellm.protocol.cli import add_model_arguments, settings_from_namespace
from kubellm.protocol.settings import ServeSettings


def server_version() -> str:
    try:
        return version("kubellm-server")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubellm", description="kubellm: Kubernetes-native LLM serving."
    )
    parser.add_argument("--version", action="version", version=f"kubellm {server_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    serve = commands.add_parser(
        "serve",
        help="Serve a model with an OpenAI-compatible HTTP API.",
        description="Serve a model with an OpenAI-compatible HTTP API. Every flag can also be "
        "set as the environment variable KUBELLM_<FLAG> (CLI > environment > default).",
    )
    add_model_arguments(serve, ServeSettings)
    return parser


def parse_serve_settings(
    parser: argparse.ArgumentParser, args: argparse.Namespace, environ: Mapping[str, str]
) -> ServeSettings:
    """Validate once; a bad value exits 2 with a message naming the flag."""
    namespace = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "command"})
    try:
        return cast(ServeSettings, settings_from_namespace(ServeSettings, namespace, environ))
    except ValueError as e:
        serve_parser = _subparser(parser, "serve")
        serve_parser.error(str(e))


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found = action.choices.get(name)
            if isinstance(found, argparse.ArgumentParser):
                return found
    return parser


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        settings = parse_serve_settings(parser, args, os.environ if environ is None else environ)
        from kubellm.protocol.logs import configure_logging
        from kubellm.server.launcher import run_server

        configure_logging(settings.frontend.log_format)
        return run_server(settings)
    parser.error(f"unknown command {args.command!r}")


if __name__ == "__main__":
    sys.exit(main())
