"""Tokenizer loading, encode/decode and chat template rendering, on a tiny byte-level BPE."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from kubellm.server.tokenizer import (
    ChatTemplateError,
    Tokenizer,
    TokenizerLoadError,
    resolve_chat_template,
)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Hello world, this is a tiny corpus for a tiny tokenizer.",
    "The capital of France is Paris. Le café est très bon.",
    "漢字 and emoji 🙂 are multi-byte characters.",
] * 5
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer_dir(path: Path, config: dict[str, object] | None = None) -> Path:
    """Train a tiny byte-level BPE and write tokenizer.json + tokenizer_config.json."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    cfg: dict[str, object] = {
        "bos_token": "<|im_start|>",
        "eos_token": {"content": "<|im_end|>", "special": True},
        "pad_token": "<|endoftext|>",
        "chat_template": TEMPLATE,
    }
    cfg.update(config or {})
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer.from_dir(build_tokenizer_dir(tmp_path_factory.mktemp("tok")))


def test_round_trip_multibyte_text(tok: Tokenizer) -> None:
    text = "Le café 漢字 🙂 Paris"
    ids = tok.encode(text)
    assert ids and all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_special_tokens_from_config(tok: Tokenizer) -> None:
    assert tok.eos_token == "<|im_end|>"  # from an AddedToken dict
    assert tok.eos_token_id == tok.encode("<|im_end|>", add_special_tokens=False)[0]
    assert tok.bos_token_id is not None and tok.bos_token_id in tok.all_special_ids
    assert set(tok.all_special_ids) == {tok.encode(s, False)[0] for s in SPECIALS}
    ids = tok.encode("Hello<|im_end|>", add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) == "Hello"
    assert tok.decode(ids, skip_special_tokens=False) == "Hello<|im_end|>"
    assert tok.convert_ids_to_tokens([tok.eos_token_id]) == ["<|im_end|>"]


def test_add_bos_token(tmp_path: Path) -> None:
    tok = Tokenizer.from_dir(build_tokenizer_dir(tmp_path, {"add_bos_token": True}))
    assert tok.encode("Hello")[0] == tok.bos_token_id
    assert tok.encode("Hello", add_special_tokens=False)[0] != tok.bos_token_id
    assert tok.encode("<|im_start|>Hello").count(tok.bos_token_id) == 1


def test_token_bytes_reassemble_split_characters(tok: Tokenizer) -> None:
    for text in ("é", "漢字", "🙂", "café Paris"):
        ids = tok.encode(text, add_special_tokens=False)
        assert b"".join(tok.token_bytes(i) for i in ids) == text.encode()


def test_missing_tokenizer_json_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TokenizerLoadError, match=r"no tokenizer\.json"):
        Tokenizer.from_dir(tmp_path)


def test_template_list_uses_default(tmp_path: Path) -> None:
    templates = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "D"}]
    tok = Tokenizer.from_dir(build_tokenizer_dir(tmp_path, {"chat_template": templates}))
    assert tok.chat_template == "D"


def test_apply_chat_template(tok: Tokenizer) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    out = tok.apply_chat_template(TEMPLATE, messages)
    assert out == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    bare = tok.apply_chat_template(TEMPLATE, messages, add_generation_prompt=False)
    assert bare == "<|im_start|>user\nHi<|im_end|>\n"


def test_template_helpers_and_variables(tok: Tokenizer) -> None:
    template = (
        "{{ bos_token }}|{{ eos_token }}|{{ tools | tojson }}|{{ {'a': '<é>'} | tojson }}|"
        "{{ strftime_now('%Y') | length }}|{{ custom }}"
    )
    out = tok.apply_chat_template(template, [], tools=[{"x": 1}], custom="k")
    assert out == '<|im_start|>|<|im_end|>|[{"x": 1}]|{"a": "<é>"}|4|k'


def test_raise_exception_and_sandbox(tok: Tokenizer) -> None:
    with pytest.raises(ChatTemplateError, match="no system"):
        tok.apply_chat_template("{{ raise_exception('no system') }}", [])
    with pytest.raises(ChatTemplateError):
        tok.apply_chat_template("{{ messages.append(1) }}", [])
    with pytest.raises(ChatTemplateError):
        tok.apply_chat_template("{% for %}", [])
    with pytest.raises(ChatTemplateError):
        tok.apply_chat_template("{% for i in range(10**9) %}{% endfor %}", [])


def test_loopcontrols(tok: Tokenizer) -> None:
    template = "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}"
    msgs = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    assert tok.apply_chat_template(template, msgs) == "a"


def test_resolve_chat_template(tok: Tokenizer, tmp_path: Path) -> None:
    assert resolve_chat_template(None, tok) == TEMPLATE
    path = tmp_path / "t.jinja"
    path.write_text("{{ messages | length }}")
    assert resolve_chat_template(str(path), tok) == "{{ messages | length }}"
    assert resolve_chat_template("{{ 1 }}", tok) == "{{ 1 }}"
    with pytest.raises(ValueError, match="neither an existing file"):
        resolve_chat_template(str(tmp_path / "missing.jinja"), tok)
    with pytest.raises(ValueError, match="invalid chat template"):
        resolve_chat_template("{% if %}", tok)


def test_token_text_keeps_spaces_and_added_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("Le café<|im_end|>", add_special_tokens=False)
    assert "".join(tok.token_text(i) for i in ids) == "Le café<|im_end|>"
    assert tok.token_bytes(tok.eos_token_id or 0) == b"<|im_end|>"


def test_sentencepiece_style_pieces(tmp_path: Path) -> None:
    vocab = {"<unk>": 0, "▁Hello": 1, "▁world": 2, "<0xE6>": 3}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Metaspace()
    hf.decoder = decoders.Metaspace()
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.token_bytes(2) == b" world" and tok.token_bytes(3) == b"\xe6"
    assert tok.token_text(1) + tok.token_text(2) == " Hello world"
