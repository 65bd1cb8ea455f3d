"""The model's tokenizer (Hugging Face `tokenizers`) and its Jinja chat template.

Reads `tokenizer.json` plus `tokenizer_config.json` (special tokens, `add_bos_token`,
`chat_template`). Chat templates render in a sandboxed, immutable Jinja environment with the
helpers that Hugging Face templates expect (`raise_exception`, `strftime_now`, `tojson`).
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
from tokenizers import Tokenizer as HFTokenizer

logger = logging.getLogger(__name__)

SENTENCEPIECE_SPACE = "\u2581"
"""SentencePiece's stand-in for a space ("▁")."""


class TokenizerLoadError(ValueError):
    """The tokenizer files are missing or unreadable."""


class ChatTemplateError(ValueError):
    """A chat template failed to compile or render (the request's fault: HTTP 400)."""


def _token_content(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _template_from_config(value: Any) -> str | None:
    """`chat_template` is a string, or a list of {name, template} (use "default")."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        chosen = named.get("default")
        return chosen if isinstance(chosen, str) else None
    return None


@functools.cache
def _bytes_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable stand-in character → byte value."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += list(range(ord("®"), ord("ÿ") + 1))
    chars = list(keep)
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars, strict=True)}


class Tokenizer:
    """Encode/decode text and render chat templates for one model."""

    def __init__(self, tokenizer: HFTokenizer, config: dict[str, Any] | None = None) -> None:
        config = config or {}
        self._tok = tokenizer
        self.bos_token = _token_content(config.get("bos_token"))
        self.eos_token = _token_content(config.get("eos_token"))
        self.pad_token = _token_content(config.get("pad_token"))
        self.add_bos_token = config.get("add_bos_token") is True
        self.chat_template = _template_from_config(config.get("chat_template"))
        self.bos_token_id = self._id_of(self.bos_token)
        self.eos_token_id = self._id_of(self.eos_token)
        self.pad_token_id = self._id_of(self.pad_token)
        added = self._tok.get_added_tokens_decoder()
        self._added_contents: dict[int, str] = {int(i): t.content for i, t in added.items()}
        special = {t.content for t in added.values() if t.special}
        special.update(t for t in (self.bos_token, self.eos_token, self.pad_token) if t)
        ids = (self._id_of(t) for t in special)
        self.all_special_ids: list[int] = sorted(i for i in ids if i is not None)
        self._byte_level = "ByteLevel" in json.dumps(json.loads(tokenizer.to_str()).get("decoder"))

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json` (required) and `tokenizer_config.json` (optional) from `path`."""
        root = Path(path)
        tok_file = root / "tokenizer.json"
        if not tok_file.is_file():
            raise TokenizerLoadError(
                f"{root} has no tokenizer.json: kubellm needs a Hugging Face fast tokenizer file"
            )
        try:
            tokenizer = HFTokenizer.from_file(str(tok_file))
        except Exception as e:
            raise TokenizerLoadError(f"cannot load {tok_file}: {e}") from e
        config: dict[str, Any] = {}
        cfg_file = root / "tokenizer_config.json"
        if cfg_file.is_file():
            try:
                config = json.loads(cfg_file.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise TokenizerLoadError(f"cannot read {cfg_file}: {e}") from e
        if not config.get("chat_template"):
            template_file = root / "chat_template.jinja"
            if template_file.is_file():
                config["chat_template"] = template_file.read_text(encoding="utf-8")
        logger.debug("loaded tokenizer from %s", root)
        return cls(tokenizer, config)

    def _id_of(self, token: str | None) -> int | None:
        if token is None:
            return None
        found = self._tok.token_to_id(token)
        return int(found) if found is not None else None

    @property
    def vocab_size(self) -> int:
        """Vocabulary size including added tokens."""
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)
        bos = self.bos_token_id
        if add_special_tokens and self.add_bos_token and bos is not None:
            ids = ids if ids[:1] == [bos] else [bos, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        return [self._tok.id_to_token(i) or "" for i in ids]

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token stands for (a token may hold part of a UTF-8 character)."""
        added = self._added_contents.get(token_id)
        if added is not None:
            return added.encode("utf-8")
        piece = self._tok.id_to_token(token_id) or ""
        if self._byte_level:
            table = _bytes_decoder()
            if all(c in table for c in piece):
                return bytes(table[c] for c in piece)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                pass
        if SENTENCEPIECE_SPACE in piece:
            return piece.replace(SENTENCEPIECE_SPACE, " ").encode("utf-8")
        return self.decode([token_id], skip_special_tokens=False).encode("utf-8")

    def token_text(self, token_id: int) -> str:
        """One token as text, leading space included (for logprobs); a partial UTF-8
        character shows as U+FFFD."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def apply_chat_template(
        self,
        template: str,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render `messages` with `template`; raises ChatTemplateError on any template error."""
        compiled = _compile(template)
        variables = {
            **kwargs,
            "messages": list(messages),
            "bos_token": self.bos_token or "",
            "eos_token": self.eos_token or "",
            "pad_token": self.pad_token or "",
            "add_generation_prompt": add_generation_prompt,
            "tools": list(tools) if tools is not None else None,
        }
        try:
            return compiled.render(**variables)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template error: {e}") from e
        except Exception as e:  # the sandbox raises many kinds (OverflowError for big ranges)
            raise ChatTemplateError(f"chat template failed to render: {e}") from e


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """Hugging Face's `tojson`: no HTML escaping, unlike Jinja's built-in filter."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"invalid chat template: {e}") from e


def resolve_chat_template(arg: str | None, tokenizer: Tokenizer) -> str | None:
    """The template in force: --chat-template (a file path if such a file exists, else inline
    Jinja text), otherwise the model's own (None when it has none)."""
    if arg is None or arg == "":
        return tokenizer.chat_template
    try:
        is_file = Path(arg).is_file()
    except (OSError, ValueError):
        is_file = False
    if is_file:
        try:
            template = Path(arg).read_text(encoding="utf-8")
        except OSError as e:
            raise ValueError(f"--chat-template: cannot read {arg}: {e}") from e
    elif "{" in arg:
        template = arg
    else:
        raise ValueError(
            f"--chat-template: {arg!r} is neither an existing file nor a Jinja template"
        )
    _compile(template)
    return template
