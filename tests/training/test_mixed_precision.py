"""A half-precision frozen base: LoRA, its optimizer state and every score stay float32."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from loraprune import prune
from loraprune.config import PruneConfig
from loraprune.models.loading import load_model
from loraprune.training.checkpoint import load_checkpoint
from loraprune.training.recipe import train_while_pruning


def _config(model_dir, text, **overrides) -> PruneConfig:
    settings = {"model": str(model_dir), "data": f"text:{text}", "sparsity": 0.3, "steps": 8, "prune_every": 2,
                "seq_len": 32, "eval_seq_len": 32, "eval_tokens": 640, "save_every": 4, "lr": 1e-3,
                "dtype": "bfloat16"}
    return PruneConfig(**{**settings, **overrides})


@pytest.mark.parametrize("criterion", ["lora", "grad"])  # fisher: the export test below
def test_bfloat16_base_trains_float32_lora_state_and_scores(tiny_run_inputs, tmp_path, criterion):
    model_dir, text = tiny_run_inputs
    config = _config(model_dir, text, criterion=criterion)
    model, _ = load_model(config.model, config.dtype)
    blocks = torch.randint(0, 100, (16, config.seq_len), generator=torch.Generator().manual_seed(0))
    (tmp_path / "run").mkdir()
    outcome = train_while_pruning(model, blocks, config, tmp_path / "run", progress=False)

    lora = {n: p.dtype for n, p in outcome.model.named_parameters() if "lora_" in n}
    frozen = {n: p.dtype for n, p in outcome.model.named_parameters() if "lora_" not in n}
    assert lora and set(lora.values()) == {torch.float32}
    assert set(frozen.values()) == {torch.bfloat16}
    checkpoint = load_checkpoint(tmp_path / "run")
    optimizer_state = [t for state in checkpoint.optimizer["state"].values() for t in state.values()
                       if torch.is_tensor(t) and t.numel() > 1]
    assert optimizer_state and {t.dtype for t in optimizer_state} == {torch.float32}
    scores = {k: t for k, t in checkpoint.scores.items() if k.startswith("layers.")}
    assert scores and {t.dtype for t in scores.values()} == {torch.float32}
    assert all(bool(torch.isfinite(t).all()) for t in scores.values())
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == config.steps and all(math.isfinite(entry["loss"]) for entry in log)
    assert abs(outcome.achieved_sparsity - 0.3) < 0.02


def test_bfloat16_run_exports_a_bfloat16_model_that_passes_the_logit_check(tiny_run_inputs, tmp_path):
    model_dir, text = tiny_run_inputs
    result = prune(_config(model_dir, text, criterion="fisher"), tmp_path / "out", progress=False)
    report = json.loads((tmp_path / "out" / "loraprune.json").read_text())
    check = report["export"]["logit_check"]
    assert check["passed"] and check["slicing"]["relative_difference"] <= check["tolerance"]
    assert math.isfinite(result.pruned_perplexity.ppl)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert exported.dtype == torch.bfloat16
    assert exported.num_parameters() < AutoModelForCausalLM.from_pretrained(model_dir).num_parameters()
