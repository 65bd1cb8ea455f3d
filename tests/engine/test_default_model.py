"""The embedded default model (SmolLM2-135M-Instruct GGUF), converted by gguf_convert, against
transformers' own GGUF loader as the reference.

Slow: one real conversion (a few seconds) and one transformers GGUF load (~17 s), each done once
per session. KUBELLM_CACHE_DIR points into the session's tmp dir so that ~/.cache stays clean.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubellm.engine import gguf_convert
from kubellm.engine.model_files import default_gguf_path, resolve_model

pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

# No digits after a run of whitespace and no non-ASCII numerals after a space: there transformers'
# GGUF tokenizer and llama.cpp split differently (see test_digits_split_like_llama_cpp).
SAMPLES = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    " leading space and trailing space ",
    "many    spaces\tand\ttabs",
    "line one\nline two\n\n\nline five\r\n",
    "Numbers: 12345, 3.14159, 1,000,000 and 2024-11-21.",
    "Punctuation!? (parens) [brackets] {braces} <angle> 'quotes' \"double\" -- ... ;:",
    "it's don't we'll they've I'm you'd she's",
    "Café naïve résumé façade jalapeño Ærøskøbing",
    "日本語のテキストと中文文本, 한국어",
    "emoji 🎉👍🏽 and ZWJ 👩‍💻 ok",
    "def f(x):\n    return x ** 2  # square\n",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><repo_name>kubellm<file_sep>",
]
DIGIT_EDGE_CASES = ["Total:   42 items", "x² ½ 10²", "tabs\t\t7 and\n\n 99 red balloons"]
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Count to 3."},
    ],
]


@pytest.fixture(scope="session")
def converted_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """resolve_model(None) once, into a session cache dir (KUBELLM_CACHE_DIR set meanwhile)."""
    cache = tmp_path_factory.getbasetemp() / "kubellm-cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KUBELLM_CACHE_DIR", str(cache))
        yield resolve_model(None)
    shutil.rmtree(cache, ignore_errors=True)  # 540 MB; pytest keeps its last tmp dirs around


@pytest.fixture(scope="session")
def reference_tokenizer() -> Any:
    """transformers' tokenizer built from the GGUF file itself."""
    gguf = default_gguf_path()
    return transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


@pytest.fixture(scope="session")
def reference_model() -> Any:
    """transformers' model loaded (dequantized) from the GGUF file itself."""
    torch.set_num_threads(1)
    gguf = default_gguf_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def our_model(converted_dir: Path) -> Any:
    torch.set_num_threads(1)
    model = transformers.LlamaForCausalLM.from_pretrained(converted_dir, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def our_tokenizer(converted_dir: Path) -> Any:
    return tokenizers.Tokenizer.from_file(str(converted_dir / "tokenizer.json"))


def test_converted_dir_has_a_full_checkpoint(converted_dir: Path) -> None:
    names = {p.name for p in converted_dir.iterdir()}
    expected = {"config.json", "generation_config.json", "model.safetensors"}
    assert expected | {"tokenizer.json", "tokenizer_config.json"} <= names


def test_second_resolve_reuses_the_cache(
    converted_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the default model was converted again")

    monkeypatch.setattr(gguf_convert, "convert_gguf", refuse)
    assert resolve_model(None) == converted_dir


def test_config_matches_transformers_gguf_config(converted_dir: Path, reference_model: Any) -> None:
    ours = transformers.AutoConfig.from_pretrained(converted_dir)
    ref = reference_model.config
    keys = [
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "max_position_embeddings",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    ]
    assert {k: getattr(ours, k) for k in keys} == {k: getattr(ref, k) for k in keys}
    assert ours.rms_norm_eps == pytest.approx(ref.rms_norm_eps)
    assert ours.rope_parameters["rope_theta"] == pytest.approx(ref.rope_parameters["rope_theta"])


def test_tokenizer_ids_match_transformers(our_tokenizer: Any, reference_tokenizer: Any) -> None:
    for text in SAMPLES:
        expected = reference_tokenizer(text)["input_ids"]
        assert our_tokenizer.encode(text).ids == expected, text
        assert our_tokenizer.decode(expected, skip_special_tokens=False) == (
            reference_tokenizer.decode(expected, skip_special_tokens=False)
        )


def test_special_tokens_stay_whole(our_tokenizer: Any) -> None:
    ids = our_tokenizer.encode("<|im_start|>user<|im_end|>").ids
    assert ids[0] == our_tokenizer.token_to_id("<|im_start|>")
    assert ids[-1] == our_tokenizer.token_to_id("<|im_end|>")


def test_digits_split_like_llama_cpp(our_tokenizer: Any, reference_tokenizer: Any) -> None:
    """The GGUF says `tokenizer.ggml.pre = smollm`: llama.cpp (and SmolLM2's own tokenizer.json)
    split every digit (`\\p{N}`) before the GPT-2 regex. transformers' GGUF loader knows no
    `smollm` entry and skips that split, so we compare with its tokenizer given llama.cpp's rule."""
    from tokenizers import Regex, Tokenizer, pre_tokenizers

    reference = Tokenizer.from_str(reference_tokenizer.backend_tokenizer.to_str())
    reference.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    for text in SAMPLES + DIGIT_EDGE_CASES:
        assert our_tokenizer.encode(text).ids == reference.encode(text).ids, text


def test_tokenizer_config_loads_in_transformers(
    converted_dir: Path, our_tokenizer: Any, reference_tokenizer: Any
) -> None:
    ours = transformers.AutoTokenizer.from_pretrained(converted_dir)
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(ours, name) == getattr(reference_tokenizer, name), name
    for text in SAMPLES:
        assert ours(text)["input_ids"] == our_tokenizer.encode(text).ids, text


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_renders_like_transformers(
    converted_dir: Path, reference_tokenizer: Any, add_generation_prompt: bool
) -> None:
    ours = transformers.AutoTokenizer.from_pretrained(converted_dir)
    for messages in CONVERSATIONS:
        kwargs = {"tokenize": False, "add_generation_prompt": add_generation_prompt}
        rendered = ours.apply_chat_template(messages, **kwargs)
        assert rendered == reference_tokenizer.apply_chat_template(messages, **kwargs)
        assert rendered.startswith("<|im_start|>system\n")


def test_logits_match_transformers_gguf_load(
    our_model: Any, reference_model: Any, our_tokenizer: Any
) -> None:
    """Same dequantized weights, so the logits agree; a wrong Q/K un-permute would not."""
    text = (
        "<|im_start|>user\nWrite a short poem about rivers, mountains and the sea, "
        "in the style of an old sailor's song.<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = torch.tensor([our_tokenizer.encode(text).ids])
    assert ids.shape[1] > 24
    with torch.no_grad():
        ours = our_model(ids).logits
        ref = reference_model(ids).logits
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_greedy_says_paris(our_model: Any, our_tokenizer: Any) -> None:
    ids = torch.tensor([our_tokenizer.encode("The capital of France is").ids])
    with torch.no_grad():
        out = our_model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=3,
            do_sample=False,
            pad_token_id=our_model.config.eos_token_id,
        )
    continuation = our_tokenizer.decode(out[0, ids.shape[1] :].tolist())
    assert continuation.startswith(" Paris"), continuation
