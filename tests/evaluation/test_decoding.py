"""The repetition penalty a pruned model ships with: chosen mildest-first against the dense model's greedy text."""

from __future__ import annotations

import pytest
import torch

from loraprune.evaluation import decoding
from loraprune.evaluation.decoding import TOLERANCE, choose_repetition_penalty, repetition_on, tuning_prompts


def scored(monkeypatch, dense: float, pruned: dict[float, float]) -> tuple[list[float], type]:
    """Make repetition_on return ``dense`` inside the dense view and ``pruned[penalty]`` outside it;
    returns the list the penalties asked for are appended to, and the dense view."""
    asked, in_dense = [], []

    class DenseView:
        def __enter__(self):
            in_dense.append(True)

        def __exit__(self, *exc):
            in_dense.pop()

    def fake(model, tokenizer, prompts, repetition_penalty=1.0):
        if in_dense:
            assert repetition_penalty == 1.0  # the bar is the dense model's plain greedy text
            return dense
        asked.append(repetition_penalty)
        return pruned[repetition_penalty]

    monkeypatch.setattr(decoding, "repetition_on", fake)
    return asked, DenseView


def test_the_mildest_penalty_within_the_tolerance_of_dense_is_chosen_and_stronger_ones_are_not_tried(monkeypatch):
    asked, view = scored(monkeypatch, dense=0.10, pruned={1.0: 0.6, 1.05: 0.3, 1.1: 0.10 + TOLERANCE, 1.15: 0.0})
    choice = choose_repetition_penalty(None, None, ["a prompt"], view)
    assert choice.repetition_penalty == 1.1 and choice.how == "measured"
    assert asked == [1.0, 1.05, 1.1]
    assert choice.dense_repetition == pytest.approx(0.10) and list(choice.tried) == ["1.0", "1.05", "1.1"]


def test_no_penalty_when_the_pruned_model_already_repeats_no_more_than_dense(monkeypatch):
    asked, view = scored(monkeypatch, dense=0.3, pruned={1.0: 0.2})
    assert choose_repetition_penalty(None, None, ["a prompt"], view).repetition_penalty == 1.0
    assert asked == [1.0]


def test_the_strongest_candidate_when_none_reaches_the_bar(monkeypatch):
    candidates = (1.0, 1.1, 1.2)
    asked, view = scored(monkeypatch, dense=0.0, pruned={p: 0.5 for p in candidates})
    assert choose_repetition_penalty(None, None, ["a prompt"], view, candidates).repetition_penalty == 1.2
    assert asked == list(candidates)


def test_tuning_prompts_are_spread_over_the_text_and_as_long_as_asked(number_tokenizer):
    ids = torch.arange(2, 102)  # "w0" ... "w99"
    prompts = tuning_prompts(number_tokenizer, ids, count=4, length=5)
    assert [p.split()[0] for p in prompts] == ["w0", "w23", "w46", "w69"]
    assert all(len(p.split()) == 5 for p in prompts)
    assert len(tuning_prompts(number_tokenizer, ids[:6], count=4, length=5)) == 2  # a short text gives fewer


@pytest.mark.slow
def test_a_penalty_breaks_the_real_models_loop(smollm2):
    model, tokenizer = smollm2
    looping = ["The old house at the end of the lane had"]  # the dense SmolLM2's loopiest health prompt
    assert repetition_on(model, tokenizer, looping, 1.3) < repetition_on(model, tokenizer, looping) - 0.2
