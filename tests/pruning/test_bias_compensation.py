"""Bias compensation: removed units output their running mean, and the export carries it as a bias."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig

from loraprune.errors import LoraPruneError
from loraprune.export import ExportRequest, export_model
from loraprune.export.nemotron_nas_reader import load_decilm
from loraprune.models import spec_for
from loraprune.pruning.groups import LayerShape
from loraprune.pruning.masks import ModelMasks
from tests.export.test_nemotron_nas_writer import TINY as NAS_TINY
from tests.export.test_nemotron_nas_writer import per_layer_masks
from tests.export.test_transformers_writer import (
    TINY,
    masked_logits,
    reload_in_fresh_process,
    tiny_model,
    uniform_masks,
)

CONFIG = LlamaConfig(num_attention_heads=8, num_key_value_heads=4, **TINY)


def _ids(seed: int, length: int = 12) -> torch.Tensor:
    return torch.randint(0, CONFIG.vocab_size, (2, length), generator=torch.Generator().manual_seed(seed))


def _down_proj_inputs(model, spec, ids: torch.Tensor, layer: int = 0) -> torch.Tensor:
    """What down_proj of ``layer`` receives (after the mask hook, which runs first)."""
    seen = []
    down_proj = model.base_model.model.model.layers[layer].mlp.down_proj
    handle = down_proj.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].detach()))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    return seen[0]


def _trained_compensated_masks(model, spec, shape: LayerShape) -> ModelMasks:
    """Means recorded over two training batches with full masks, then units removed."""
    masks = ModelMasks.full(shape, CONFIG.num_hidden_layers).compensate(shape.head_dim)
    masks.attach(model, spec)
    model.train()
    with torch.no_grad():
        model(input_ids=_ids(2))
        model(input_ids=_ids(3))
    model.eval()
    masks.detach()
    removed = uniform_masks(shape, CONFIG.num_hidden_layers, 2, 2, 50)
    for mask, kept in zip(masks.layers, removed.layers):
        mask.heads.copy_(kept.heads)
        mask.ffn.copy_(kept.ffn)
    return masks


def test_removed_units_output_their_mean_over_the_training_tokens_seen_while_kept():
    model, spec, shape = tiny_model(CONFIG), spec_for(CONFIG), LayerShape.from_config(CONFIG)
    plain = ModelMasks.full(shape, CONFIG.num_hidden_layers)
    plain.attach(model, spec)
    tokens_seen = torch.cat([_down_proj_inputs(model, spec, _ids(s)).reshape(-1, TINY["intermediate_size"])
                             for s in (2, 3)])
    plain.detach()
    masks = _trained_compensated_masks(model, spec, shape)
    torch.testing.assert_close(masks.means[0].ffn.mean(), tokens_seen.mean(dim=0), rtol=1e-5, atol=1e-6)

    masks.attach(model, spec)
    fed = _down_proj_inputs(model, spec, _ids(4))  # eval mode: read, not recorded
    removed = ~masks.layers[0].ffn
    torch.testing.assert_close(fed[..., removed], tokens_seen.mean(dim=0)[removed].expand_as(fed[..., removed]),
                               rtol=1e-5, atol=1e-6)
    counts_before = masks.means[0].ffn.counts.clone()
    model.train()
    _down_proj_inputs(model, spec, _ids(5))  # training: kept features count on, removed ones stay frozen
    masks.detach()
    counts = masks.means[0].ffn.counts
    assert torch.equal(counts[removed], counts_before[removed])
    assert (counts[~removed] > counts_before[~removed]).all()


def test_means_survive_the_masks_state_dict():
    model, spec, shape = tiny_model(CONFIG), spec_for(CONFIG), LayerShape.from_config(CONFIG)
    masks = _trained_compensated_masks(model, spec, shape)
    loaded = ModelMasks.full(shape, CONFIG.num_hidden_layers)
    loaded.load_state_dict(masks.state_dict())
    assert loaded.means is not None
    for saved, restored in zip(masks.means, loaded.means):
        torch.testing.assert_close(restored.attention.mean(), saved.attention.mean())
        torch.testing.assert_close(restored.ffn.mean(), saved.ffn.mean())


def test_compensation_changes_the_masked_model_and_the_plain_folder_reproduces_it(tmp_path):
    model, spec, shape = tiny_model(CONFIG), spec_for(CONFIG), LayerShape.from_config(CONFIG)
    masks = _trained_compensated_masks(model, spec, shape)
    probe = _ids(6)
    expected = masked_logits(model, masks, spec, probe)
    uncompensated = masked_logits(model, ModelMasks([m for m in masks.layers]), spec, probe)
    assert (expected - uncompensated).abs().max() > 1e-3

    out = export_model(ExportRequest(model, masks, None, {"model": "tiny"}, tmp_path / "pruned"))

    reloaded = reload_in_fresh_process(out, probe, tmp_path)
    assert reloaded["architecture"] == "LlamaForCausalLM"
    torch.testing.assert_close(reloaded["logits"], expected, rtol=1e-4, atol=1e-4)


def test_the_per_layer_decilm_folder_reproduces_the_compensated_model(tmp_path):
    config = LlamaConfig(**{**NAS_TINY, "num_hidden_layers": 3})
    model, spec, shape = tiny_model(config), spec_for(config), LayerShape.from_config(config)
    masks = ModelMasks.full(shape, config.num_hidden_layers).compensate(shape.head_dim)
    masks.attach(model, spec)
    model.train()
    with torch.no_grad():
        model(input_ids=_ids(2))
    model.eval()
    masks.detach()
    widths = per_layer_masks([[1, 1, 0, 0, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0]], [70, 37, 61], NAS_TINY["intermediate_size"])
    for mask, kept in zip(masks.layers, widths.layers):
        mask.heads.copy_(kept.heads)
        mask.ffn.copy_(kept.ffn)
    probe = _ids(7)
    expected = masked_logits(model, masks, spec, probe)

    out = export_model(ExportRequest(model, masks, None, {"model": "tiny"}, tmp_path / "pruned",
                                     format="nemotron-nas"))

    torch.testing.assert_close(load_decilm(out, torch.float32)(input_ids=probe).logits.detach(), expected,
                               rtol=1e-4, atol=1e-4)
    # vLLM's DeciLM (nemotron_nas.py) builds q/k/v/o biases from attention_bias and the MLP's from mlp_bias.
    config_json = json.loads((out / "config.json").read_text())
    assert config_json["attention_bias"] and config_json["mlp_bias"]


def test_gguf_is_refused_before_training():
    from loraprune.config import PruneConfig
    from loraprune.job import _check_format_fits

    with pytest.raises(LoraPruneError, match="--bias-compensation is not written to GGUF files yet"):
        _check_format_fits(tiny_model(CONFIG), None, PruneConfig(bias_compensation=True), "gguf", "f32")
