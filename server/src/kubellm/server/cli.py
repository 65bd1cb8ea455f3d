"""The `kubellm` command: `kubellm serve [MODEL] [flags]`, `kubellm zmq-keys DIR` and
`kubellm --version`.

The serve flags are generated from `ServeSettings` (one flag per field, help text from the
field docstrings, env KUBELLM_<FIELD>); precedence is CLI > environment > default. `serve` runs
one of three shapes (docs/design/0003-scale-out.md): `--headless` engine hosts, the multi shape
(`--api-server-count` > 1) and the single shape (one API server process).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import cast

from kubellm.protocol.cli import add_model_arguments, settings_from_namespace
from kubellm.protocol.settings import ServeSettings

EXIT_FAILURE = 1


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
    keys = commands.add_parser(
        "zmq-keys",
        help="Write the CURVE key pairs for --zmq-curve-dir.",
        description="Write a head and an engine CURVE key pair into DIR (e.g. to make a "
        "Kubernetes Secret from). Head pods need head.key_secret and engine.key; engine pods "
        "need engine.key_secret and head.key.",
    )
    keys.add_argument("directory", metavar="DIR", help="Directory to write the key files into.")
    keys.add_argument(
        "--force", action="store_true", help="Overwrite key files that already exist."
    )
    return parser


def parse_serve_settings(
    parser: argparse.ArgumentParser, args: argparse.Namespace, environ: Mapping[str, str]
) -> ServeSettings:
    """Validate once; a bad value or an incoherent combination of flags exits 2 with a message
    naming the flags."""
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


def run_serve(settings: ServeSettings) -> int:
    """Run the shape the parallel settings ask for; returns the process exit code."""
    from kubellm.protocol.logs import configure_logging

    configure_logging(settings.frontend.log_format)
    parallel = settings.parallel
    if parallel.headless:
        from kubellm.server.supervisor import run_headless

        return run_headless(settings)
    if parallel.api_servers > 1:
        from kubellm.server.supervisor import run_multi

        return run_multi(settings)
    from kubellm.server.launcher import run_server

    return run_server(settings)


def run_zmq_keys(directory: Path, *, force: bool) -> int:
    """`kubellm zmq-keys DIR`: write the key pairs and say which pod needs which file."""
    from kubellm.engine.transport import (
        CURVE_ENGINE_KEY,
        CURVE_ENGINE_SECRET,
        CURVE_HEAD_KEY,
        CURVE_HEAD_SECRET,
        create_curve_keys,
    )

    names = (CURVE_HEAD_KEY, CURVE_HEAD_SECRET, CURVE_ENGINE_KEY, CURVE_ENGINE_SECRET)
    existing = [name for name in names if (directory / name).exists()]
    if existing and not force:
        sys.stderr.write(
            f"kubellm zmq-keys: {directory} already holds {', '.join(existing)}; "
            "pass --force to replace them\n"
        )
        return EXIT_FAILURE
    try:
        written = create_curve_keys(directory)
    except OSError as e:
        sys.stderr.write(f"kubellm zmq-keys: cannot write keys into {directory}: {e}\n")
        return EXIT_FAILURE
    lines = [f"wrote {path}" for path in written] + [
        f"head pods (API servers) need: {CURVE_HEAD_SECRET}, {CURVE_ENGINE_KEY}",
        f"engine pods (--headless) need: {CURVE_ENGINE_SECRET}, {CURVE_HEAD_KEY}",
        "a head that also runs engines needs all four files",
        f"then pass --zmq-curve-dir {directory} (or the path where they are mounted)",
    ]
    sys.stdout.write("".join(line + "\n" for line in lines))
    return 0


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        settings = parse_serve_settings(parser, args, os.environ if environ is None else environ)
        return run_serve(settings)
    if args.command == "zmq-keys":
        return run_zmq_keys(Path(args.directory), force=args.force)
    parser.error(f"unknown command {args.command!r}")


if __name__ == "__main__":
    sys.exit(main())
