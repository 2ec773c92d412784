"""Tests for perplexity: the paper's arithmetic against a direct computation, on tiny models.

Also checks batching does not change the number, and that token counts are exact.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from loraprune.errors import LoraPruneError
from loraprune.evaluation.perplexity import evaluate_perplexity, perplexity


def direct_perplexity(model, blocks: torch.Tensor) -> float:
    """exp of the mean cross-entropy over all predicted tokens, one window at a time."""
    losses = []
    with torch.no_grad():
        for window in blocks:
            logits = model(input_ids=window[None]).logits[0]
            losses.append(F.cross_entropy(logits[:-1], window[1:], reduction="none"))
    return math.exp(torch.cat(losses).mean().item())


def random_blocks(n_windows: int, seq_len: int, vocab: int = 256, seed: int = 0) -> torch.Tensor:
    """Random token ids of shape (n_windows, seq_len)."""
    return torch.randint(0, vocab, (n_windows, seq_len), generator=torch.Generator().manual_seed(seed))


def test_perplexity_matches_direct_cross_entropy(tiny_model):
    blocks = random_blocks(5, 33)
    result = perplexity(tiny_model, blocks, progress=False)
    assert result.ppl == pytest.approx(direct_perplexity(tiny_model, blocks), rel=1e-5)
    assert result.nll == pytest.approx(math.log(result.ppl))
    assert (result.n_windows, result.seq_len, result.n_tokens) == (5, 33, 5 * 32)


def test_batching_does_not_change_perplexity(tiny_llama):
    blocks = random_blocks(7, 16)
    one = perplexity(tiny_llama, blocks, batch_size=1, progress=False)
    three = perplexity(tiny_llama, blocks, batch_size=3, progress=False)
    assert three.ppl == pytest.approx(one.ppl, rel=1e-5)
    assert three.n_tokens == one.n_tokens == 7 * 15


def test_random_model_perplexity_is_near_vocabulary_size(tiny_llama):
    # A random model is nearly uniform over its 256 tokens.
    result = perplexity(tiny_llama, random_blocks(4, 64), progress=False)
    assert 128 < result.ppl < 512


def test_result_to_dict_holds_every_field(tiny_llama):
    result = perplexity(tiny_llama, random_blocks(2, 8), progress=False).to_dict()
    assert set(result) == {
        "ppl",
        "nll",
        "n_tokens",
        "seq_len",
        "n_windows",
        "seconds",
        "tokens_per_second",
        "data",
        "split",
    }
    assert result["tokens_per_second"] > 0


@pytest.mark.parametrize("shape", [(0, 8), (3, 1), (8,)])
def test_blocks_that_predict_nothing_are_refused(tiny_llama, shape):
    with pytest.raises(LoraPruneError, match="blocks of shape"):
        perplexity(tiny_llama, torch.zeros(shape, dtype=torch.long), progress=False)


def test_non_positive_batch_size_is_refused(tiny_llama):
    with pytest.raises(LoraPruneError, match="--batch-size"):
        perplexity(tiny_llama, random_blocks(2, 8), batch_size=0, progress=False)


def test_evaluate_perplexity_reads_the_validation_split_and_labels_the_result(tiny_llama, tmp_path):
    from tests.conftest import build_word_tokenizer

    words = [f"w{i}" for i in range(200)]
    tokenizer = build_word_tokenizer(words)
    (tmp_path / "train.txt").write_text(" ".join(words[:50]))
    (tmp_path / "validation.txt").write_text(" ".join(words[100:200]))
    result = evaluate_perplexity(tiny_llama, tokenizer, f"text:{tmp_path}", seq_len=16, max_tokens=64)
    blocks = torch.arange(102, 166).view(4, 16)  # w100.. have ids 102..
    assert result.ppl == pytest.approx(direct_perplexity(tiny_llama, blocks), rel=1e-5)
    assert (result.data, result.split, result.n_tokens) == (f"text:{tmp_path}", "validation", 60)
