"""The quality harness: repetition score, fidelity to the dense model, out-of-domain choice, batched generation."""

from __future__ import annotations

import pytest
import torch

from loraprune.evaluation.fidelity import dense_view, fidelity
from loraprune.evaluation.generation import greedy_batch, health_prompts, repeated_ngram_fraction
from loraprune.evaluation.harness import out_of_domain_data
from loraprune.models import spec_for
from loraprune.pruning.masks import ModelMasks


def test_repetition_score_is_high_for_a_looping_text_and_zero_for_distinct_tokens():
    looping = ["the", "universe", "is", "not", "the", "universe", ",", "but"] * 8
    assert repeated_ngram_fraction(looping) > 0.8
    assert repeated_ngram_fraction(list(range(64))) == 0.0
    assert repeated_ngram_fraction([1, 2, 3]) == 0.0  # too short to hold a 4-gram


def test_kl_of_a_model_with_itself_is_zero_and_every_top1_agrees(tiny_llama):
    blocks = torch.randint(0, tiny_llama.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    result = fidelity(tiny_llama, blocks)
    assert result.kl < 1e-6 and result.top1_agreement == 1.0
    assert result.n_tokens == 3 * 15


def test_kl_to_the_dense_view_is_positive_once_units_are_masked(tiny_llama):
    masks = ModelMasks.for_model(tiny_llama)
    masks.attach(tiny_llama, spec_for(tiny_llama.config))
    blocks = torch.randint(0, tiny_llama.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    for layer in masks.layers:
        layer.ffn[: layer.ffn.numel() // 2] = False
    result = fidelity(tiny_llama, blocks, dense_view(tiny_llama, masks))
    assert result.kl > 1e-5 and result.top1_agreement < 1.0


def test_out_of_domain_text_is_the_builtin_corpus_the_run_did_not_train_on():
    assert out_of_domain_data("austen") == "pydoc"
    assert out_of_domain_data("pydoc") == "austen"
    assert out_of_domain_data("austen+self") == "pydoc"
    assert out_of_domain_data("text:/tmp/my.txt") == "pydoc"


@pytest.mark.parametrize("penalty", [None, 3.0])
def test_left_padded_batch_generates_what_each_prompt_generates_alone(tiny_llama, number_tokenizer, penalty):
    prompts = ["w1 w2 w3 w4 w5 w6", "w7", "w8 w9 w10"]
    together = greedy_batch(tiny_llama, number_tokenizer, prompts, new_tokens=8, repetition_penalty=penalty)
    alone = [greedy_batch(tiny_llama, number_tokenizer, [p], new_tokens=8, repetition_penalty=penalty)[0]
             for p in prompts]
    assert together == alone and all(len(ids) == 8 for ids in alone)


def test_health_prompts_cover_prose_code_facts_and_chat_with_at_least_20(number_tokenizer):
    kinds = [kind for kind, _ in health_prompts(number_tokenizer)]
    assert len(kinds) >= 20 and set(kinds) == {"prose", "code", "facts", "chat"}


def test_out_of_domain_text_avoids_the_calibration_text_and_says_when_none_is_left(capsys):
    from loraprune.cli import _print_out_of_domain

    assert out_of_domain_data("austen+pydoc") == "austen"  # both seen: the summary must say so
    perplexity = {"data": "austen", "n_windows": 2, "seq_len": 512, "n_tokens": 1022, "ppl": 40.0}
    health = {"repetition": 0.1, "new_tokens": 64, "n_prompts": 21}
    before = {"perplexity": {**perplexity, "ppl": 33.0}, "generation": health}
    after = {"perplexity": perplexity, "fidelity": {"n_tokens": 1022, "kl": 0.5, "top1_agreement": 0.6},
             "generation": health}
    _print_out_of_domain({"before": before, "after": after, "seen_while_pruning": True})
    assert "(1.21x) — not unseen: the run trained or scored on its training split" in capsys.readouterr().out
    _print_out_of_domain({"before": before, "after": after, "seen_while_pruning": False})
    assert "not unseen" not in capsys.readouterr().out
