"""The benchmark suite's quick mode, so the scripts that write docs/benchmarks.md cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from quality import METHODS, QUICK, QUICK_METHODS, Settings, _config, ratios_to_dense, selection_key, summary_lines


@pytest.mark.slow
def test_quick_benchmark_suite_runs_each_path_and_writes_nothing_into_docs(tmp_path, austen_dir, smollm2):
    docs_before = sorted(p.name for p in (ROOT / "docs").rglob("*")) if (ROOT / "docs").exists() else []
    results = tmp_path / "quality-quick.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--quick",
                           "--results", str(results)], check=False, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = json.loads(results.read_text())["runs"]
    methods = {row["method"] for row in runs.values()}
    assert methods == set(QUICK_METHODS)
    for row in runs.values():
        assert row["ppl_austen"] > 1 and row["ppl_pydoc"] > 1
        assert 0 <= row["generation"]["repetition"] <= 1 and row["generation"]["n_prompts"] >= 20
        assert (row["fidelity_pydoc"]["kl"] == 0) == (row["method"] == "dense")
        if row["target_sparsity"]:
            assert abs(row["achieved_sparsity"] - row["target_sparsity"]) < 0.01
    assert "lora_vs_grad" in done.stdout and "default_vs_finetune" in done.stdout
    assert sorted(p.name for p in (ROOT / "docs").rglob("*")) == docs_before


def _row(method: str, sparsity: float, austen: float, pydoc: float, repetition: float) -> dict:
    return {"method": method, "target_sparsity": sparsity, "seed": 0, "ppl_austen": austen, "ppl_pydoc": pydoc,
            "generation": {"repetition": repetition}}


def test_selection_measure_is_the_geometric_mean_of_both_ratios_and_repetition_breaks_ties():
    dense = _row("dense", 0.0, 30.0, 10.0, 0.05)
    in_domain_winner = _row("fisher+global", 0.2, 33.0, 40.0, 0.1)  # 1.1× in, 4× out
    balanced = _row("fisher+global+distill", 0.2, 36.0, 15.0, 0.1)  # 1.2× in, 1.5× out
    assert ratios_to_dense(balanced, dense) == (1.2, 1.5, (1.2 * 1.5) ** 0.5)
    assert selection_key(balanced, dense) < selection_key(in_domain_winner, dense)
    looping = _row("fisher+global+kl", 0.2, 36.0, 15.0, 0.4)
    assert selection_key(balanced, dense) < selection_key(looping, dense)
    results = {"settings": {"seed": 0, "sparsities": [0.2]},
               "runs": {r["method"]: r for r in (dense, in_domain_winner, balanced, looping)}}
    lines = summary_lines(results)
    assert "picks `fisher+global+distill`" in lines[1] and "pydoc ≤ 1.6×: 1.50×, met" in lines[2]
    assert "Northanger Abbey ≤ 1.25×: 1.20×, met" in lines[2]


def test_a_run_scored_on_pydoc_is_reported_beside_its_twin_but_never_picked():
    dense = _row("dense", 0.0, 30.0, 10.0, 0.05)
    scored_on_data = {**_row("fisher+global", 0.2, 36.0, 24.0, 0.6), "settings": {"criterion": "fisher"}}
    calibrated = {**_row("fisher+global/cal:austen+pydoc", 0.2, 39.0, 14.0, 0.5),
                  "settings": {"criterion": "fisher", "calibration": "austen+pydoc"}}
    assert METHODS[calibrated["method"]].scored_on_pydoc and not METHODS["fisher+global"].scored_on_pydoc
    results = {"settings": {"seed": 0, "sparsities": [0.2]},
               "runs": {r["method"]: r for r in (dense, scored_on_data, calibrated)}}
    lines = summary_lines(results)
    assert "picks `fisher+global`:" in lines[1]
    assert lines[-1].startswith("  - Scored on `austen+pydoc` (`--calibration`), recovered on Austen, against "
                                "`fisher+global`: Northanger Abbey 1.30× against 1.20×, pydoc 1.40× against 2.40×")
    assert "Not a candidate for the default" in lines[-1] and "pydoc ≤ 1.6×: 1.40×, met" in lines[-1]


def test_a_run_at_its_own_learning_rate_trains_at_it_is_reported_beside_its_twin_and_can_be_picked():
    method = METHODS["fisher+global/lr:4e-4"]
    assert _config(Settings(), method, 0.2, seed=0).lr == 4e-4 != Settings().lr
    assert _config(Settings(), METHODS["fisher+global"], 0.2, seed=0).lr == Settings().lr
    dense = _row("dense", 0.0, 30.0, 10.0, 0.05)
    suite_lr = _row("fisher+global", 0.2, 36.0, 24.0, 0.6)
    faster = _row("fisher+global/lr:4e-4", 0.2, 33.0, 24.0, 0.5)
    results = {"settings": {"seed": 0, "sparsities": [0.2], "lr": 2e-4},
               "runs": {r["method"]: r for r in (dense, suite_lr, faster)}}
    lines = summary_lines(results)
    assert "picks `fisher+global/lr:4e-4`:" in lines[1]
    assert lines[-1].startswith("  - lr 4e-4 against 2e-4 for `fisher+global`: geometric mean 1.62 against 1.70 (-4.3%)")


def test_a_self_scored_run_at_its_own_rate_stands_beside_the_run_at_that_rate_and_can_be_picked():
    dense = _row("dense", 0.0, 30.0, 10.0, 0.05)
    at_rate = _row("fisher+global/lr:8e-4", 0.2, 36.0, 24.0, 0.6)
    self_scored = _row("fisher+global/cal:self/lr:8e-4", 0.2, 39.0, 18.0, 0.5)
    assert not METHODS[self_scored["method"]].scored_on_pydoc
    results = {"settings": {"seed": 0, "sparsities": [0.2], "lr": 2e-4},
               "runs": {r["method"]: r for r in (dense, at_rate, self_scored)}}
    lines = summary_lines(results)
    assert "picks `fisher+global/cal:self/lr:8e-4`:" in lines[1]
    assert any(line.startswith("  - Scored on `self` (`--calibration`), recovered on Austen, against "
                               "`fisher+global/lr:8e-4`: Northanger Abbey 1.30× against 1.20×, pydoc 1.80× against "
                               "2.40×") for line in lines)


def test_suite_scores_self_on_the_blocks_prune_samples_from_bos_once(tmp_path, monkeypatch):
    import quality

    from loraprune.data.generated import scoring_text
    from tests.conftest import build_tiny_model, build_word_tokenizer

    model, tokenizer = build_tiny_model("llama"), build_word_tokenizer([f"w{i}" for i in range(100)], bos=True)
    monkeypatch.setattr(quality, "SELF_TEXT", tmp_path)
    config = _config(Settings(steps=10, seq_len=24), METHODS["fisher+global/cal:self"], 0.2, seed=0)
    (blocks,) = quality.calibration_blocks(config, model, tokenizer)
    scored_steps = 9  # steps before the cool-down (the last 10 %): one sample each
    assert torch.equal(blocks, scoring_text(model, tokenizer, scored_steps, 24, seed=0, progress=False))
    assert (blocks[:, 0] == tokenizer.bos_token_id).all()

    def no_second_sampling(*args, **kwargs):
        raise AssertionError("the suite sampled again instead of reading its cached scoring text")

    monkeypatch.setattr(quality, "scoring_text", no_second_sampling)
    assert torch.equal(quality.calibration_blocks(config, model, tokenizer)[0], blocks)


def test_every_method_of_the_suite_is_a_valid_run():
    """The quick run takes a few methods; every other row must at least be a configuration prune accepts."""
    for method in METHODS.values():
        for sparsity in Settings().sparsities:
            _config(Settings(), method, sparsity, seed=0).validate()
    assert set(QUICK_METHODS) <= set(METHODS) and len(QUICK.plan) == len(QUICK_METHODS)
    wide = _config(Settings(), METHODS["fisher+global/lr:8e-4/rank:32"], 0.2, seed=0)
    assert (wide.lora.rank, wide.lora.alpha, wide.lr) == (32, 64, 8e-4)  # the LoRA part is reached, not dropped


def test_suite_trains_on_the_data_each_method_names_and_samples_self_text_once(tmp_path, monkeypatch):
    import quality

    from tests.conftest import build_tiny_model, build_word_tokenizer

    words = [f"w{i}" for i in range(100)]
    model, tokenizer = build_tiny_model("llama"), build_word_tokenizer(words, bos=True)
    monkeypatch.setattr(quality, "SELF_TEXT", tmp_path)
    monkeypatch.setattr(quality, "load_corpus", lambda name, split: " ".join(words))
    settings = quality.Settings(steps=6, seq_len=24)
    austen = torch.zeros(10, 24, dtype=torch.long)
    mixed = quality.recovery_blocks(model, tokenizer, settings, quality.METHODS["fisher+global@austen+self"], 0, austen)
    assert len(mixed) == 2 and mixed[0] is austen and mixed[1].shape == (3, 24)  # half the samples each
    alone = quality.recovery_blocks(model, tokenizer, settings, quality.METHODS["fisher+global+distill@self"], 0, austen)
    assert len(alone) == 1 and alone[0].shape == (6, 24) and (alone[0][:, 0] == tokenizer.bos_token_id).all()
    assert quality.recovery_blocks(model, tokenizer, settings, quality.METHODS["fisher+global"], 0, austen) == [austen]

    def no_second_sampling(*args, **kwargs):
        raise AssertionError("the suite sampled again instead of reading its cached self text")

    monkeypatch.setattr(quality, "generate_text", no_second_sampling)
    again = quality.recovery_blocks(model, tokenizer, settings, quality.METHODS["fisher+global+distill@self"], 0, austen)
    assert torch.equal(again[0], alone[0])
    other_method = quality.recovery_blocks(model, tokenizer, settings,
                                           quality.METHODS["fisher+global+distill@austen+self"], 0, austen)
    assert torch.equal(other_method[1], mixed[1])  # every run with the same data trains on the same samples


def test_speed_at_scale_models_are_k_quant_widths_of_one_size_per_sparsity():
    from speed_at_scale import AS_DECI, llama_config, model_widths, parameter_count

    config = llama_config("llama-3.2-1b")
    models = model_widths("llama-3.2-1b")
    assert parameter_count(config, models["dense"]) == 1_235_814_400  # Llama-3.2-1B's published count
    for sparsity in (0.2, 0.5):
        uniform, per_layer = models[f"uniform-{sparsity}"], models[f"global-{sparsity}"]
        assert len(set(uniform)) == 1 and len(set(per_layer)) > 1
        assert abs(parameter_count(config, per_layer) / parameter_count(config, uniform) - 1) < 0.005
        assert abs(1 - parameter_count(config, uniform) / 1_235_814_400 - sparsity) < 0.02
        assert all(w.ffn % 256 == 0 and w.heads * 64 % 256 == 0 for w in uniform + per_layer)
    assert models[f"uniform-0.5{AS_DECI}"] == models["uniform-0.5"]
