"""`kubellm serve` settings of head and engine pods, built from the spec (pure).

The operator owns the flags that follow from the spec (model, ports, the data-parallel layout, the
revision); `spec.engine.extraArgs` may set any other flag. Extra arguments are parsed with the
very parser generator the server uses (`kubellm.protocol.cli.add_model_arguments`), so an unknown
or malformed flag is refused here, with a message, instead of crash-looping pods.
"""

from __future__ import annotations

import argparse
import functools
from typing import Any, NoReturn

from pydantic import ValidationError

from kubellm.operator.spec import LLMServerSpec
from kubellm.protocol.cli import add_model_arguments, flag_name, settings_from_namespace
from kubellm.protocol.settings import ServeSettings

OWNED = {
    "model": "spec.model",
    "max_model_len": "spec.maxModelLen",
    "host": "the operator",
    "port": "the operator",
    "uds": "the operator",
    "served_model_name": "spec.servedModelName",
    "api_key": "spec.apiKeySecretRef",
    "shutdown_timeout": "spec.shutdownTimeoutSeconds",
    "api_server_count": "spec.head.apiServersPerPod",
    "headless": "the operator",
    "data_parallel_size": "spec.engine.maxReplicas",
    "data_parallel_size_local": "the operator",
    "data_parallel_start_rank": "the operator (from the pod ordinal)",
    "data_parallel_address": "the operator",
    "data_parallel_rpc_port": "the operator",
    "deployment_revision": "the operator (the spec hash)",
}
"""Settings the operator sets itself, and where their value comes from."""


class RenderError(ValueError):
    """The spec cannot be rendered; the message names the spec field to fix."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise RenderError(f"spec.engine.extraArgs: {message}")


@functools.cache
def _parser() -> _Parser:
    parser = _Parser(prog="kubellm serve", add_help=False, allow_abbrev=False)
    add_model_arguments(parser, ServeSettings)
    return parser


def extra_settings(extra_args: list[str]) -> dict[str, dict[str, Any]]:
    """The settings `extraArgs` gives, per section (engine/frontend/parallel), validated."""
    namespace = _parser().parse_args(list(extra_args))
    given = [key.split(".", 1) for key in vars(namespace)]
    for _section, field in given:
        if field in OWNED:
            raise RenderError(
                f"spec.engine.extraArgs must not set {flag_name(field)}: it comes from "
                f"{OWNED[field]}"
            )
    try:
        parsed = settings_from_namespace(ServeSettings, namespace, environ={})
    except ValueError as e:
        raise RenderError(f"spec.engine.extraArgs: {e}") from None
    out: dict[str, dict[str, Any]] = {"engine": {}, "frontend": {}, "parallel": {}}
    for section, field in given:
        out[section][field] = getattr(getattr(parsed, section), field)
    return out


def _build(
    extra: dict[str, dict[str, Any]],
    owned: dict[str, dict[str, Any]],
    defaults: dict[str, dict[str, Any]],
) -> ServeSettings:
    data: dict[str, dict[str, Any]] = {}
    for section in ("engine", "frontend", "parallel"):
        data[section] = {**defaults.get(section, {}), **extra[section], **owned.get(section, {})}
    try:
        return ServeSettings.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(str(err["msg"]).removeprefix("Value error, ") for err in e.errors())
        raise RenderError(f"spec.engine.extraArgs: {problems}") from None


def data_parallel_size(spec: LLMServerSpec) -> int:
    """D for head and engines: engine.maxReplicas, the ranks the head accepts. Not
    engine.replicas, so that scaling changes no pod's arguments (the head serves while at least
    one engine is ready: `--min-ready-engines 1`)."""
    return spec.engine.max_replicas


def _common(spec: LLMServerSpec, http_port: int, revision: str) -> dict[str, dict[str, Any]]:
    return {
        "engine": {"model": _model_path(spec), "max_model_len": spec.max_model_len},
        "frontend": {"port": http_port, "shutdown_timeout": float(spec.shutdown_timeout_seconds)},
        "parallel": {
            "data_parallel_size": data_parallel_size(spec),
            "deployment_revision": revision,
        },
    }


def _model_path(spec: LLMServerSpec) -> str:
    return spec.model.path if spec.model.path is not None else "/models"


def head_settings(
    name: str, spec: LLMServerSpec, http_port: int, rpc_port: int, revision: str
) -> ServeSettings:
    """API servers only (`--data-parallel-size-local 0`), bound on the pod IP for the engines."""
    owned = _common(spec, http_port, revision)
    owned["frontend"]["served_model_name"] = (spec.served_model_name or name,)
    owned["parallel"].update(
        api_server_count=spec.head.api_servers_per_pod,
        data_parallel_size_local=0,
        data_parallel_address="$(POD_IP)",  # expanded by the kubelet from the POD_IP env var
        data_parallel_rpc_port=rpc_port,
    )
    # Serve while any engine is ready: one engine down must not take the endpoint away.
    defaults: dict[str, dict[str, Any]] = {"parallel": {"min_ready_engines": 1}}
    return _build(extra_settings(spec.engine.extra_args), owned, defaults)


def engine_settings(
    head_address: str, spec: LLMServerSpec, http_port: int, rpc_port: int, revision: str
) -> ServeSettings:
    """One headless engine per pod; its rank comes from the environment (pod ordinal)."""
    owned = _common(spec, http_port, revision)
    owned["parallel"].update(
        headless=True,
        data_parallel_size_local=1,
        data_parallel_address=head_address,
        data_parallel_rpc_port=rpc_port,
    )
    defaults: dict[str, dict[str, Any]] = {}
    if spec.engine.gpus_per_pod == 0:
        defaults["engine"] = {"device": "cpu"}
    return _build(extra_settings(spec.engine.extra_args), owned, defaults)
