"""Generate argparse flags and environment variables from the typed settings models.

Field `max_model_len` of a section becomes flag `--max-model-len` and env var
`KUBELLM_MAX_MODEL_LEN`. Precedence: CLI > environment > default. Validation happens once, in
pydantic; its errors are reported against the flag name, at parse time.
"""

from __future__ import annotations

import argparse
import os
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

ENV_PREFIX = "KUBELLM_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def _strip_optional(annotation: Any) -> tuple[Any, bool]:
    origin = get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def _is_tuple_of_str(annotation: Any) -> bool:
    return get_origin(annotation) is tuple


def _scalar_type(annotation: Any) -> Any:
    if annotation in (int, float, str):
        return annotation
    return str


def _sections(model: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """Sub-models of a root settings model (e.g. engine, frontend)."""
    out = {}
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out[name] = ann
    return out


def add_model_arguments(
    parser: argparse.ArgumentParser, root: type[BaseModel], *, exclude: Sequence[str] = ()
) -> None:
    """Add one flag per field of each section of `root` (all with default SUPPRESS)."""
    for section, model in _sections(root).items():
        group = parser.add_argument_group(f"{section} options", model.__doc__)
        for name, info in model.model_fields.items():
            if name in exclude:
                continue
            _add_field(group, section, name, info)


def _add_field(group: Any, section: str, name: str, info: FieldInfo) -> None:
    ann, _optional = _strip_optional(info.annotation)
    default = info.default
    shown = (
        "none"
        if default is None
        else (",".join(default) if isinstance(default, tuple) else default)
    )
    help_text = (info.description or "").replace("%", "%%")
    help_text = f"{help_text} [env: {env_name(name)}; default: {shown}]"
    dest = f"{section}.{name}"
    kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": help_text}
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    if extra.get("positional"):
        positional = {k: v for k, v in kwargs.items() if k != "dest"}
        group.add_argument(dest, nargs="?", metavar=name.upper(), **positional)
        kwargs["help"] = f"Same as the positional {name.upper()}."
    if ann is bool:
        group.add_argument(flag_name(name), action=argparse.BooleanOptionalAction, **kwargs)
    elif _is_tuple_of_str(ann):
        group.add_argument(flag_name(name), nargs="+", metavar="VALUE", **kwargs)
    elif get_origin(ann) is Literal:
        group.add_argument(flag_name(name), choices=[str(a) for a in get_args(ann)], **kwargs)
    else:
        group.add_argument(flag_name(name), type=_scalar_type(ann), metavar=name.upper(), **kwargs)


def _from_env(name: str, info: FieldInfo, environ: Mapping[str, str]) -> Any:
    raw = environ.get(env_name(name))
    if raw is None:
        return None
    ann, _ = _strip_optional(info.annotation)
    if ann is bool:
        low = raw.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(f"{env_name(name)}={raw!r} is not a boolean (use 1/0, true/false)")
    if _is_tuple_of_str(ann):
        return tuple(p.strip() for p in raw.split(",") if p.strip())
    return raw


def settings_from_namespace(
    root: type[BaseModel], ns: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> BaseModel:
    """Merge CLI values over environment values over defaults, and validate once.

    Raises ValueError with messages that name flags, never Python field paths.
    """
    environ = os.environ if environ is None else environ
    given = vars(ns)
    data: dict[str, dict[str, Any]] = {}
    for section, model in _sections(root).items():
        values: dict[str, Any] = {}
        for name, info in model.model_fields.items():
            key = f"{section}.{name}"
            if key in given:
                value = given[key]
                ann, _ = _strip_optional(info.annotation)
                if _is_tuple_of_str(ann) and isinstance(value, list):
                    value = tuple(value)
                values[name] = value
            else:
                env_value = _from_env(name, info, environ)
                if env_value is not None:
                    values[name] = env_value
        data[section] = values
    try:
        return root.model_validate(data)
    except ValidationError as e:
        raise ValueError(_describe(e)) from None


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        loc = [str(p) for p in item["loc"] if not str(p).isdigit()]
        where = flag_name(loc[-1]) if len(loc) >= 2 else "arguments"
        msg = item["msg"].removeprefix("Value error, ")
        lines.append(f"{where}: {msg}" if len(loc) >= 2 else msg)
    return "; ".join(lines)


def to_args(settings: BaseModel) -> list[str]:
    """Render settings back into CLI arguments (non-default values only, sorted by flag).

    The operator renders pod arguments with this; `settings_from_namespace` round-trips them.
    """
    args: list[str] = []
    for section, model in _sections(type(settings)).items():
        sub = getattr(settings, section)
        for name, info in sorted(model.model_fields.items()):
            value = getattr(sub, name)
            if value == info.default:
                continue
            flag = flag_name(name)
            if isinstance(value, bool):
                args.append(flag if value else "--no-" + flag[2:])
            elif isinstance(value, tuple):
                args += [flag, *map(str, value)]
            else:
                args += [flag, str(value)]
    return args
