"""Shared fixtures: tiny random models of each supported family, a tiny tokenizer, real SmolLM2.

Tiny models build in well under a second; the `smollm2` fixture converts the GGUF once per cache.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from loraprune.data import find_austen_dir
from loraprune.errors import LoraPruneError

TINY_SIZES = {
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 128,
    "vocab_size": 256,
    "max_position_embeddings": 512,
}
TINY_CONFIGS = {
    "llama": lambda: LlamaConfig(**TINY_SIZES),
    "mistral": lambda: MistralConfig(**TINY_SIZES, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**TINY_SIZES),
}


def pytest_configure(config) -> None:
    """Two pytest-xdist workers share the machine's cores: one thread each (and in the processes they
    start), so neither waits on the other's spinning threads."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def build_tiny_model(family: str, seed: int = 0):
    """A randomly initialised tiny causal LM of `family` in eval mode, float32."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[family](), dtype=torch.float32)
    return model.eval()


@pytest.fixture(params=sorted(TINY_CONFIGS))
def tiny_model(request):
    """One tiny random model per architecture family."""
    return build_tiny_model(request.param)


@pytest.fixture
def tiny_llama():
    """A tiny random LLaMA model."""
    return build_tiny_model("llama")


def build_word_tokenizer(words: list[str], bos: bool = False) -> PreTrainedTokenizerFast:
    """An in-memory word-level tokenizer over `words` (+ <unk>, <s>), optionally adding a BOS."""
    vocab = {"<unk>": 0, "<s>": 1}
    for word in words:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        from tokenizers.processors import TemplateProcessing

        backend.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>")


@pytest.fixture
def number_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer for the words "w0" ... "w99" (ids 2 ... 101); adds no BOS."""
    return build_word_tokenizer([f"w{i}" for i in range(100)])


@pytest.fixture(autouse=True)
def one_thread_for_tiny_models(request):
    """Tiny models run faster on one thread (thread hand-offs cost more than their matmuls)."""
    if request.node.get_closest_marker("slow") is not None:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch, request):
    """Fast tests cache into a temporary folder; slow tests share the user's cache (conversion)."""
    if request.node.get_closest_marker("slow") is None:
        monkeypatch.setenv("LORAPRUNE_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def austen_dir():
    """The Austen novels, found as the library finds them, or a skip saying how to provide them."""
    try:
        return find_austen_dir()
    except LoraPruneError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (model, tokenizer), converted from the packaged GGUF on first use."""
    from loraprune.models.loading import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2's byte-level BPE tokenizer, read from the packaged GGUF (no model conversion)."""
    from transformers import AutoTokenizer

    from loraprune.models.loading import builtin_gguf_path

    try:
        path = builtin_gguf_path()
    except LoraPruneError as e:
        pytest.skip(str(e))
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def save_tiny_run_inputs(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """Save a tiny LLaMA with a word tokenizer and a text file of its words; return both paths."""
    words = [f"w{i}" for i in range(100)]
    model_dir = folder / "tiny-llama"
    build_tiny_model("llama", seed).save_pretrained(model_dir)
    build_word_tokenizer(words).save_pretrained(model_dir)
    rng = random.Random(0)
    text = folder / "corpus.txt"
    text.write_text("\n".join(" ".join(rng.choice(words[:30]) for _ in range(40)) for _ in range(200)))
    return model_dir, text


@pytest.fixture
def tiny_run_inputs(tmp_path) -> tuple[Path, Path]:
    """A saved tiny LLaMA with a word tokenizer, and a text file of its words."""
    return save_tiny_run_inputs(tmp_path)


# A tiny Llama with SmolLM2's vocabulary, so SmolLM2's tokenizer (which a GGUF file needs) fits it.
GGUF_TINY_CONFIG = {"hidden_size": 96, "num_hidden_layers": 4, "num_attention_heads": 6, "num_key_value_heads": 3,
                    "head_dim": 16, "intermediate_size": 96, "vocab_size": 49152, "max_position_embeddings": 512,
                    "tie_word_embeddings": True, "rms_norm_eps": 1e-5, "initializer_range": 0.1}
GGUF_TINY_TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
                  "must be in want of a wife. However little known the feelings or views of such a man may be "
                  "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
                  "surrounding families, that he is considered the rightful property of some one or other of "
                  "their daughters.")


def save_gguf_tiny_run_inputs(folder: Path, tokenizer) -> tuple[Path, Path]:
    """Save a tiny LLaMA with SmolLM2's tokenizer (exportable as GGUF) and an English text; return both paths."""
    from transformers import LlamaConfig

    torch.manual_seed(0)
    model_dir = folder / "tiny-smollm2"
    AutoModelForCausalLM.from_config(LlamaConfig(**GGUF_TINY_CONFIG), dtype=torch.float32).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    text = folder / "english.txt"
    text.write_text((GGUF_TINY_TEXT + "\n") * 100)
    return model_dir, text


def gguf_tiny_prune_command(model_dir: Path, text: Path, out: Path, *extra: str) -> list[str]:
    """`python -m loraprune prune --format gguf` on the GGUF-able tiny inputs, 12 steps, checkpointing every step."""
    # The embeddings are most of this tiny model: 2 % of it is what its layers can give.
    return [sys.executable, "-m", "loraprune", "prune", "--model", str(model_dir), "--data", f"text:{text}",
            "--out", str(out), "--sparsity", "0.02", "--steps", "12", "--prune-every", "2", "--seq-len", "32",
            "--eval-seq-len", "32", "--eval-tokens", "256", "--save-every", "1", "--lr", "1e-3",
            "--no-progress", "--format", "gguf", *extra]


def tiny_prune_command(model_dir: Path, text: Path, out: Path, *extra: str) -> list[str]:
    """`python -m loraprune prune` on the tiny inputs with a 12-step schedule, checkpointing every step."""
    return [sys.executable, "-m", "loraprune", "prune", "--model", str(model_dir), "--data", f"text:{text}",
            "--out", str(out), "--sparsity", "0.3", "--steps", "12", "--prune-every", "2", "--seq-len", "32",
            "--eval-seq-len", "32", "--eval-tokens", "640", "--save-every", "1", "--lr", "1e-3",
            "--no-progress", *extra]


@pytest.fixture(scope="session")
def unexported_gguf_run(smollm2_tokenizer, tmp_path_factory) -> Path:
    """A short run on a tiny model with SmolLM2's tokenizer, kept as a run folder (no export); tests only read it."""
    from loraprune.config import PruneConfig
    from loraprune.job import prune

    folder = tmp_path_factory.mktemp("run")
    model_dir, text = save_gguf_tiny_run_inputs(folder, smollm2_tokenizer)
    config = PruneConfig(model=str(model_dir), data=f"text:{text}", sparsity=0.02, steps=4, prune_every=2,
                         seq_len=32, eval_seq_len=32, eval_tokens=256, lr=1e-3, allocation="uniform")
    prune(config, folder / "out", export=False, progress=False)
    return folder / "out.partial"


@pytest.fixture(scope="session")
def uniform_gguf_file(unexported_gguf_run, tmp_path_factory) -> Path:
    """That run exported as a GGUF file of one width (architecture llama); tests only read it."""
    pytest.importorskip("xllamacpp")
    from loraprune.job import export_run

    out = tmp_path_factory.mktemp("gguf") / "out"
    return export_run(unexported_gguf_run, out, export_format="gguf") / "model.gguf"
