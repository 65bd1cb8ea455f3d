"""The `kubellm` command: `kubellm serve [MODEL] [flags]`, `kubellm zmq-keys DIR`,
`kubellm fetch-model REPO_ID --dest DIR` (the init step behind `spec.model.huggingFace`) and
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
    add_fetch_model_parser(commands)
    return parser


def add_fetch_model_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    fetch = commands.add_parser(
        "fetch-model",
        help="Fetch a safetensors checkpoint from a Hugging Face hub into a directory.",
        description="Fetch the files a server needs (config, safetensors weights, tokenizer, "
        "chat template; never pickle weights) into DEST, resumably, and record them in "
        "DEST/.kubellm-model.json. A re-run for the same repo and revision makes no network "
        "call. The hub is $HF_ENDPOINT (default https://huggingface.co); HF_HUB_OFFLINE=1 "
        "allows only an already complete DEST.",
    )
    fetch.add_argument("repo_id", metavar="REPO_ID", help="Hub repo id, e.g. Qwen/Qwen3-0.6B.")
    fetch.add_argument(
        "--revision", default="main", help="Branch, tag or commit sha (default: main)."
    )
    fetch.add_argument("--dest", required=True, help="Directory to fetch into (created).")
    fetch.add_argument(
        "--token-file",
        metavar="PATH",
        help="File holding the hub token (default: the HF_TOKEN environment variable).",
    )
    fetch.add_argument(
        "--include",
        action="append",
        metavar="PATTERN",
        help="Fetch the files matching PATTERN (fnmatch on the path in the repo) instead of "
        "the default set; repeatable.",
    )
    fetch.add_argument(
        "--config-only",
        action="store_true",
        help="Fetch only what an API server reads (config, tokenizer, chat template), no "
        "weights: for head pods that run no engine (--data-parallel-size-local 0).",
    )
    fetch.add_argument(
        "--force",
        action="store_true",
        help="Fetch into a DEST that holds another model (or files of unknown origin), and "
        "check an already fetched model against the hub.",
    )


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
    if args.command == "fetch-model":
        return run_fetch_model(parser, args, os.environ if environ is None else environ)
    parser.error(f"unknown command {args.command!r}")


def run_fetch_model(
    parser: argparse.ArgumentParser, args: argparse.Namespace, environ: Mapping[str, str]
) -> int:
    """`kubellm fetch-model`: bad arguments exit 2, a failed fetch exits 1 with one line."""
    from kubellm.protocol.logs import configure_logging

    # Read by huggingface_hub at import: no telemetry, and no extra request for its user-agent
    # registry (GET $HF_ENDPOINT/api/agent-harnesses), which a mirror may not serve.
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    from kubellm.server.fetch import FetchArgumentError, request_from_args, run_fetch

    try:
        request = request_from_args(
            args.repo_id,
            revision=args.revision,
            dest=args.dest,
            token_file=args.token_file,
            include=args.include,
            force=args.force,
            environ=environ,
            config_only=args.config_only,
        )
    except FetchArgumentError as e:
        _subparser(parser, "fetch-model").error(str(e))
    configure_logging()
    return run_fetch(request)


if __name__ == "__main__":
    sys.exit(main())
