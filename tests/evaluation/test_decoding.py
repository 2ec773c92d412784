"""The repetition penalty a pruned model ships with: chosen mildest-first against the dense model's greedy text."""

from __future__ import annotations

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from loraprune.evaluation import decoding
from loraprune.evaluation.decoding import choose_repetition_penalty, repetition_on, tuning_prompts
from loraprune.evaluation.generation import UnpaddedRepetitionPenalty, greedy_batch, health_prompts


def scored(monkeypatch, dense: list[float], pruned: dict[float, list[float]]) -> tuple[list[float], type]:
    """Make repetition_per_prompt return ``dense`` inside the dense view and ``pruned[penalty]`` outside it;
    returns the list the penalties asked for are appended to, and the dense view."""
    asked, in_dense = [], []

    class DenseView:
        def __enter__(self):
            in_dense.append(True)

        def __exit__(self, *exc):
            in_dense.pop()

    def fake(model, tokenizer, prompts, repetition_penalty=None):
        if in_dense:
            assert repetition_penalty is None  # the dense model decodes as its own config says
            return dense
        asked.append(repetition_penalty)
        return pruned[repetition_penalty]

    monkeypatch.setattr(decoding, "repetition_per_prompt", fake)
    return asked, DenseView


def test_the_mildest_penalty_repeating_no_more_than_dense_is_chosen_and_stronger_ones_are_not_tried(monkeypatch):
    asked, view = scored(monkeypatch, dense=[0.2, 0.0],
                         pruned={1.0: [0.6, 0.6], 1.05: [0.2, 0.05], 1.1: [0.1, 0.01], 1.15: [0.0, 0.0]})
    choice = choose_repetition_penalty(None, None, ["a prompt", "another"], view)
    assert (choice.repetition_penalty, choice.measured, choice.reached_bar) == (1.1, True, True)
    assert asked == [1.0, 1.05, 1.1]
    assert choice.dense_repetition == 0.1 and choice.dense_per_prompt == [0.2, 0.0]
    assert list(choice.tried) == ["1.0", "1.05", "1.1"]
    assert choice.excess == pytest.approx({"1.0": 0.5, "1.05": 0.025, "1.1": 0.005})


def test_less_repetition_where_dense_repeats_does_not_buy_a_loop_where_it_does_not(monkeypatch):
    # Mean against mean, 1.05 would pass (0.2 against dense's 0.3); prompt by prompt, its second prompt loops.
    asked, view = scored(monkeypatch, dense=[0.6, 0.0], pruned={1.0: [0.6, 0.5], 1.05: [0.0, 0.4], 1.1: [0.3, 0.0]})
    choice = choose_repetition_penalty(None, None, ["a list", "prose"], view)
    assert choice.repetition_penalty == 1.1 and asked == [1.0, 1.05, 1.1]
    assert choice.excess["1.05"] == pytest.approx(0.2) and 0.2 > decoding.EXCESS_TOLERANCE


def test_no_penalty_when_the_pruned_model_already_repeats_no_more_than_dense(monkeypatch):
    asked, view = scored(monkeypatch, dense=[0.3], pruned={1.0: [0.2]})
    assert choose_repetition_penalty(None, None, ["a prompt"], view).repetition_penalty == 1.0
    assert asked == [1.0]


def test_the_strongest_candidate_is_kept_and_flagged_when_none_reaches_the_bar(monkeypatch):
    candidates = (1.0, 1.1, 1.2)
    asked, view = scored(monkeypatch, dense=[0.0], pruned={p: [0.5] for p in candidates})
    choice = choose_repetition_penalty(None, None, ["a prompt"], view, candidates)
    assert (choice.repetition_penalty, choice.reached_bar) == (1.2, False)
    assert asked == list(candidates)


def test_the_tuning_prompts_cover_the_health_prompts_kinds_and_are_none_of_them(smollm2_tokenizer):
    tuning = tuning_prompts(smollm2_tokenizer)
    health = [text for _, text in health_prompts(smollm2_tokenizer)]
    assert len(tuning) == 12 and not any(prompt in health for prompt in tuning)
    assert sum(prompt.endswith("<|im_start|>assistant\n") for prompt in tuning) == 3  # in the chat template


def test_the_penalty_is_transformers_own_on_unpadded_rows_and_skips_the_left_padding():
    torch.manual_seed(0)
    scores = torch.randn(2, 10)
    rows = torch.tensor([[3, 5, 5, 7], [0, 0, 4, 9]])  # the second row is padded with two 0s
    penalised = UnpaddedRepetitionPenalty(1.3, torch.tensor([0, 2]))(rows, scores.clone())
    reference = RepetitionPenaltyLogitsProcessor(1.3)(rows, scores.clone())
    assert torch.equal(penalised[0], reference[0])
    assert torch.equal(penalised[1], RepetitionPenaltyLogitsProcessor(1.3)(rows[1:, 2:], scores[1:].clone())[0])
    assert penalised[1, 0] == scores[1, 0] != reference[1, 0]


def test_a_penalty_changes_a_tiny_models_greedy_text_and_none_leaves_it_to_the_models_config(tiny_llama,
                                                                                          number_tokenizer):
    prompt = ["w0 w1 w2 w3 w4 w5 w6 w7"]
    plain = greedy_batch(tiny_llama, number_tokenizer, prompt, new_tokens=24, repetition_penalty=1.0)
    assert greedy_batch(tiny_llama, number_tokenizer, prompt, new_tokens=24, repetition_penalty=50.0) != plain
    tiny_llama.generation_config.repetition_penalty = 50.0
    assert greedy_batch(tiny_llama, number_tokenizer, prompt, new_tokens=24) != plain
    assert greedy_batch(tiny_llama, number_tokenizer, prompt, new_tokens=24, repetition_penalty=1.0) == plain


@pytest.mark.slow
def test_a_penalty_breaks_the_real_models_loop(smollm2):
    model, tokenizer = smollm2
    looping = ["The old house at the end of the lane had"]  # the dense SmolLM2's loopiest health prompt
    assert repetition_on(model, tokenizer, looping, 1.3) < repetition_on(model, tokenizer, looping) - 0.2
