"""--data self / NAME+self: parsing, seeded sampling, alternating mix, and reuse on --resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loraprune.config import PruneConfig
from loraprune.data import load_text, tokenize_cached
from loraprune.data.generated import (
    PROMPT_TOKENS,
    SELF_FILE,
    DataSpec,
    GeneratedText,
    generate_text,
    parse_data,
    prompt_prefix,
    scoring_text,
    self_block_count,
)
from loraprune.data.sampling import BlockStream
from loraprune.errors import LoraPruneError
from loraprune.job import prune
from loraprune.training import losses
from loraprune.training.recipe import RunInterrupted
from tests.conftest import build_tiny_model, build_word_tokenizer, save_tiny_run_inputs

WORDS = [f"w{i}" for i in range(100)]


@pytest.mark.parametrize(("data", "spec"), [
    ("self", DataSpec(None, True)), ("austen+self", DataSpec("austen", True)),
    ("self+pydoc", DataSpec("pydoc", True)), ("text:a+b.txt", DataSpec("text:a+b.txt", False)),
    ("text:/x/y.txt+self", DataSpec("text:/x/y.txt", True)),
])
def test_data_names_split_into_corpus_and_self(data, spec):
    assert parse_data(data) == spec


@pytest.mark.parametrize("data", ["self+self", "+self", "self+", "self+austen+self"])
def test_self_mixed_with_other_than_one_corpus_is_refused(data):
    with pytest.raises(LoraPruneError, match="mix self with one corpus"):
        parse_data(data)


@pytest.mark.parametrize("data", ["self", "austen+self"])
def test_reading_self_as_a_text_is_refused_naming_the_readable_corpora(data):
    with pytest.raises(LoraPruneError, match="generates while pruning.*austen, pydoc, text:PATH"):
        load_text(data, "validation")


def test_generated_blocks_follow_steps_times_samples_halved_when_mixed_or_the_token_flag():
    assert self_block_count(steps=10, samples_per_step=4, mixed=False, self_tokens=None, seq_len=64) == 40
    assert self_block_count(steps=10, samples_per_step=3, mixed=True, self_tokens=None, seq_len=64) == 15
    assert self_block_count(steps=10, samples_per_step=4, mixed=True, self_tokens=1000, seq_len=64) == 16


def test_two_sources_alternate_block_by_block_and_each_visits_all_its_blocks_per_epoch():
    corpus = torch.arange(6)[:, None].repeat(1, 4)  # blocks 0..5
    samples = 100 + torch.arange(3)[:, None].repeat(1, 4)  # blocks 100..102
    stream = BlockStream([corpus, samples], seed=2, batch_size=4)
    ids = torch.cat([stream.next_batch() for _ in range(3)])[:, 0].tolist()  # 12 samples
    assert [i >= 100 for i in ids] == [False, True] * 6
    assert sorted(ids[0::2]) == list(range(6))
    assert sorted(ids[1::2]) == [100, 100, 101, 101, 102, 102]  # two epochs of the three samples
    resumed = BlockStream([corpus, samples], seed=2, batch_size=4, samples_seen=8)
    assert resumed.next_batch()[:, 0].tolist() == ids[8:12]


def test_one_source_in_a_list_gives_the_stream_of_that_tensor():
    blocks = torch.arange(10)[:, None].repeat(1, 3)
    alone, listed = BlockStream(blocks, seed=4, batch_size=3), BlockStream([blocks], seed=4, batch_size=3)
    for _ in range(5):
        assert torch.equal(alone.next_batch(), listed.next_batch())


def test_sampling_is_seeded_shaped_prompted_and_leaves_the_global_rng_alone():
    model, tokenizer = build_tiny_model("llama"), build_word_tokenizer(WORDS, bos=True)
    user_ids = np.arange(2, 60, dtype=np.int32)
    before = torch.get_rng_state()
    first = generate_text(model, tokenizer, 5, 2, seq_len=24, seed=3, user_ids=user_ids, progress=False)
    assert torch.equal(torch.get_rng_state(), before)
    again = generate_text(model, tokenizer, 5, 2, seq_len=24, seed=3, user_ids=user_ids, progress=False)
    other = generate_text(model, tokenizer, 5, 2, seq_len=24, seed=4, user_ids=user_ids, progress=False)
    assert first.train.shape == (5, 24) and first.validation.shape == (2, 24)
    assert torch.equal(first.train, again.train) and torch.equal(first.validation, again.validation)
    assert not torch.equal(first.train, other.train)
    assert (first.train[:, 0] == tokenizer.bos_token_id).all()
    prompt = first.train[:, 1 : 1 + PROMPT_TOKENS]
    # Each prompt is a run of consecutive user tokens (user_ids are consecutive numbers).
    assert (prompt.diff(dim=1) == 1).all() and (prompt >= 2).all() and (prompt < 60).all()
    assert len({tuple(row) for row in first.train.tolist()}) == 5  # temperature 1: no two alike


def test_a_chat_template_starts_every_sample_with_a_user_turn(smollm2_tokenizer):
    prefix = prompt_prefix(smollm2_tokenizer)
    text = smollm2_tokenizer.decode(prefix)
    assert text.endswith("<|im_start|>user\n") and text.startswith("<|im_start|>system")


def test_a_sequence_length_with_no_room_after_the_prompt_is_refused():
    model, tokenizer = build_tiny_model("llama"), build_word_tokenizer(WORDS, bos=True)
    with pytest.raises(LoraPruneError, match="use a larger --seq-len"):
        generate_text(model, tokenizer, 1, 0, seq_len=PROMPT_TOKENS + 1, seed=0,
                      user_ids=np.arange(2, 60, dtype=np.int32), progress=False)


def _self_config(model_dir, text, data: str) -> PruneConfig:
    return PruneConfig(model=str(model_dir), data=data.replace("TEXT", f"text:{text}"), sparsity=0.3, steps=8,
                       prune_every=2, seq_len=32, eval_seq_len=32, eval_tokens=320, save_every=1, lr=1e-3)


def _losses(out) -> list[float]:
    import json

    return [json.loads(line)["loss"] for line in (out / "run" / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("data", ["TEXT+self", "self"])
def test_interrupted_self_run_resumes_on_the_cached_samples_to_the_uninterrupted_result(
        data, tmp_path, monkeypatch):
    model_dir, text = save_tiny_run_inputs(tmp_path)
    config = _self_config(model_dir, text, data)
    reference = prune(config, tmp_path / "reference", progress=False)
    saved = GeneratedText.load(reference.output_dir / "run")
    assert len(saved.train) == (4 if "+" in data else 8)  # one block per sample, half when mixed
    assert len(saved.validation) == (0 if "+" in data else 1)
    if data == "self":
        assert reference.dense_perplexity.data == "self" and reference.dense_perplexity.n_windows == 1

    real_loss, calls = losses.NextTokenCrossEntropy.__call__, []

    def interrupt_at_step_five(self, model, batch, teacher_logits=None, labels=None):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_loss(self, model, batch, teacher_logits, labels=labels)

    monkeypatch.setattr(losses.NextTokenCrossEntropy, "__call__", interrupt_at_step_five)
    out = tmp_path / "out"
    with pytest.raises(RunInterrupted):
        prune(config, out, progress=False)
    assert (tmp_path / "out.partial" / SELF_FILE).is_file()
    monkeypatch.setattr(losses.NextTokenCrossEntropy, "__call__", real_loss)

    def no_sampling_on_resume(*args, **kwargs):
        raise AssertionError("a resumed run must reuse its cached samples")

    monkeypatch.setattr("loraprune.job.generate_text", no_sampling_on_resume)
    resumed = prune(config, out, resume=True, progress=False)
    reused = GeneratedText.load(out / "run")
    assert torch.equal(reused.train, saved.train) and torch.equal(reused.validation, saved.validation)
    assert _losses(out) == _losses(reference.output_dir)
    assert resumed.report["kept_per_layer"] == reference.report["kept_per_layer"]
    assert resumed.pruned_perplexity.ppl == pytest.approx(reference.pruned_perplexity.ppl, rel=1e-6)


def test_resuming_a_self_run_without_its_samples_is_refused(tmp_path, monkeypatch):
    model_dir, text = save_tiny_run_inputs(tmp_path)
    config = _self_config(model_dir, text, "self")
    real_loss = losses.NextTokenCrossEntropy.__call__

    def interrupt(self, model, batch, teacher_logits=None, labels=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(losses.NextTokenCrossEntropy, "__call__", interrupt)
    with pytest.raises(RunInterrupted):
        prune(config, tmp_path / "out", progress=False)
    monkeypatch.setattr(losses.NextTokenCrossEntropy, "__call__", real_loss)
    (tmp_path / "out.partial" / SELF_FILE).unlink()
    with pytest.raises(LoraPruneError, match="no self-generated text to resume with; start it again"):
        prune(config, tmp_path / "out", resume=True, progress=False)


@pytest.mark.slow
def test_smollm2_samples_chat_turns_from_austen_prompts_as_likely_as_its_entropy(smollm2, austen_dir):
    model, tokenizer = smollm2
    user_ids = tokenize_cached(tokenizer, load_text("austen", "train", austen_dir))
    first = generate_text(model, tokenizer, 3, 1, seq_len=64, seed=0, user_ids=user_ids, progress=False)
    assert first.train.shape == (3, 64) and first.validation.shape == (1, 64)
    prefix = prompt_prefix(tokenizer)
    assert (first.train[:, : len(prefix)] == torch.tensor(prefix)).all()
    with torch.no_grad():
        logits = model(input_ids=first.train).logits
    start = len(prefix) + PROMPT_TOKENS
    generated_nll = torch.nn.functional.cross_entropy(logits[:, start - 1 : -1].flatten(0, 1),
                                                      first.train[:, start:].flatten())
    # The model's own temperature-1 samples are, on average, as likely as its entropy: far from
    # uniform (ln 49152 = 10.8 nats) and not degenerate repetition (near 0).
    assert 1.0 < generated_nll.item() < 6.0


@pytest.mark.slow
def test_smollm2_scoring_text_starts_at_bos_not_in_a_chat_turn(smollm2):
    model, tokenizer = smollm2
    blocks = scoring_text(model, tokenizer, 2, seq_len=32, seed=0, progress=False)
    assert blocks.shape == (2, 32) and (blocks[:, 0] == tokenizer.bos_token_id).all()
    chat_opening = prompt_prefix(tokenizer)
    assert len(chat_opening) > 1 and not (blocks[:, : len(chat_opening)] == torch.tensor(chat_opening)).all(-1).any()
    with torch.no_grad():
        logits = model(input_ids=blocks).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), blocks[:, 1:].flatten())
    assert 1.0 < nll.item() < 6.0  # the model's own temperature-1 text, neither uniform noise nor a loop
