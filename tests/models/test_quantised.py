"""A quantised frozen base (--base-bits): rows dequantise alone, runs train and export plain weights."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from loraprune import prune
from loraprune.config import PruneConfig
from loraprune.errors import LoraPruneError
from loraprune.models import count_parameters
from loraprune.models.quantised import dequantised_rows, is_quantised, quantise_frozen_base

bnb = pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize(("bits", "tolerance"), [(8, 0.01), (4, 0.15)])
def test_dequantised_rows_match_the_whole_matrix_and_the_original(tiny_llama, bits, tolerance):
    original = tiny_llama.model.layers[0].mlp.gate_proj.weight.detach().clone()  # (128, 64)
    dense_count = count_parameters(tiny_llama)
    quantise_frozen_base(tiny_llama, bits)
    gate = tiny_llama.model.layers[0].mlp.gate_proj
    assert is_quantised(gate)
    whole = dequantised_rows(gate, slice(None))
    assert torch.equal(torch.cat([dequantised_rows(gate, slice(s, s + 8)) for s in range(0, 128, 8)]), whole)
    assert float((whole - original).norm() / original.norm()) < tolerance
    assert count_parameters(tiny_llama) == dense_count  # a 4-bit weight still counts every weight


def _config(model_dir, text, **overrides) -> PruneConfig:
    settings = {"model": str(model_dir), "data": f"text:{text}", "sparsity": 0.3, "steps": 8, "prune_every": 2,
                "seq_len": 32, "eval_seq_len": 32, "eval_tokens": 640, "save_every": 4, "lr": 1e-3}
    return PruneConfig(**{**settings, **overrides})


@pytest.mark.parametrize(("bits", "criterion"), [(8, "lora"), (4, "fisher")])
def test_quantised_base_run_prunes_and_exports_plain_dequantised_weights(tiny_run_inputs, tmp_path, bits,
                                                                          criterion):
    model_dir, text = tiny_run_inputs
    result = prune(_config(model_dir, text, base_bits=bits, criterion=criterion), tmp_path / "out", progress=False)
    assert abs(result.achieved_sparsity - 0.3) < 0.02
    log = [json.loads(line) for line in (tmp_path / "out" / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 8 and all(math.isfinite(entry["loss"]) for entry in log)
    report = json.loads((tmp_path / "out" / "loraprune.json").read_text())
    assert report["config"]["base_bits"] == bits and report["export"]["logit_check"]["passed"]
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert all(type(m) is torch.nn.Linear for n, m in exported.named_modules() if n.endswith("proj"))
    assert not hasattr(exported.config, "quantization_config")
    # Merged into the dequantised weights: close to the dense original's perplexity, not noise.
    assert result.pruned_perplexity.ppl < 3 * result.dense_perplexity.ppl


def test_grad_criterion_with_a_quantised_base_is_refused_before_any_folder(tiny_run_inputs, tmp_path):
    model_dir, text = tiny_run_inputs
    with pytest.raises(LoraPruneError, match="--base-bits"):
        prune(_config(model_dir, text, base_bits=8, criterion="grad"), tmp_path / "out", progress=False)
    assert not any(tmp_path.glob("out*"))


@pytest.mark.parametrize("bits", [8, 4])
def test_dequantised_weight_is_what_the_layer_computes_in_eval_mode_too(tiny_llama, bits):
    # bitsandbytes repacks a 4-bit weight for its bfloat16 CPU kernel on the first eval-mode forward
    # (on AVX-512 BF16 machines); the export once merged those repacked bytes as if they were rows.
    quantise_frozen_base(tiny_llama, bits)
    gate = tiny_llama.model.layers[0].mlp.gate_proj
    inputs = torch.randn(6, gate.in_features, generator=torch.Generator().manual_seed(0))
    tiny_llama.eval()
    with torch.inference_mode():
        gate(inputs)
        computed = gate(inputs).float()
        dequantised = inputs @ dequantised_rows(gate, slice(None)).T
    # Both compute from the dequantised weight in float32 (8-bit: not LLM.int8's int8 matmul).
    assert float((computed - dequantised).norm() / computed.norm()) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("bits", [8, 4])
def test_smollm2_on_a_quantised_base_exports_the_model_it_trained(bits, smollm2, austen_dir, tmp_path):
    import copy

    from loraprune.data import load_text
    from loraprune.export import ExportRequest, export_model
    from loraprune.models import spec_for
    from loraprune.training.lora import wrap_with_lora
    from tests.export.test_gguf_smollm2 import smollm2_masks

    model, tokenizer = smollm2
    base = copy.deepcopy(model)
    quantise_frozen_base(base, bits)
    adapted = wrap_with_lora(base, PruneConfig(base_bits=bits), spec_for(base.config))
    with torch.no_grad():  # trained adapters: B is no longer zero
        for name, parameter in adapted.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.01, generator=torch.Generator().manual_seed(0))
    adapted.eval()
    probe = torch.tensor([tokenizer(load_text("austen", "validation", austen_dir)[:4000])["input_ids"][:128]])
    out = export_model(ExportRequest(adapted, smollm2_masks(per_layer=False), None, {}, tmp_path / "q", probe=probe))
    check = json.loads((out / "loraprune.json").read_text())["export"]["logit_check"]
    assert check["passed"] and check["exported"]["top1_agreement"] >= 0.99
    assert check["merge"]["relative_difference"] < 1e-4  # merged into exactly the weights the layers used
