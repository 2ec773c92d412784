"""The real SmolLM2, pruned and written as GGUF (f32), runs in llama.cpp as it runs in PyTorch."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from loraprune.data import load_text
from loraprune.export import ExportRequest, export_model
from loraprune.export.gguf_writer import GGUF_NAME
from loraprune.models.loading import builtin_gguf_path
from loraprune.pruning.masks import LayerMask, ModelMasks

pytest.importorskip("xllamacpp")

PROBE_TOKENS = 512


def smollm2_masks(per_layer: bool, seed: int = 0) -> ModelMasks:
    """Random masks over SmolLM2's 30 layers (9 query heads in 3 KV groups, 1536 FFN channels).

    Uniform: 2 KV groups and 1024 channels everywhere. Per layer: the first three and the last layer
    whole (as --skip-first 3 --skip-last 1), the others keep 1 or 2 KV groups and 512-1280 channels.
    """
    generator = torch.Generator().manual_seed(seed)
    layers = []
    for index in range(30):
        whole = per_layer and (index < 3 or index == 29)
        groups = 3 if whole else 2 if not per_layer else int(torch.randint(1, 3, (1,), generator=generator))
        channels = 1536 if whole else 1024 if not per_layer else int(torch.randint(512, 1281, (1,), generator=generator))
        heads = torch.zeros(3, 3, dtype=torch.bool)
        heads[torch.randperm(3, generator=generator)[:groups]] = True
        ffn = torch.zeros(1536, dtype=torch.bool)
        ffn[torch.randperm(1536, generator=generator)[:channels]] = True
        layers.append(LayerMask(heads.flatten(), ffn))
    return ModelMasks(layers)


@pytest.mark.slow
@pytest.mark.parametrize("per_layer, architecture", [(False, "llama"), (True, "deci")])
def test_pruned_smollm2_gguf_agrees_with_pytorch_on_512_tokens_of_austen(per_layer, architecture, smollm2,
                                                                         austen_dir, tmp_path):
    model, tokenizer = smollm2
    ids = tokenizer(load_text("austen", "validation", austen_dir)[:20_000])["input_ids"][:PROBE_TOKENS]
    probe = torch.tensor([ids])

    out = export_model(ExportRequest(copy.deepcopy(model), smollm2_masks(per_layer), tokenizer,
                                     {"model": "smollm2-135m"}, tmp_path / "pruned", format="gguf", probe=probe,
                                     source_gguf=builtin_gguf_path()))

    export = json.loads((out / "loraprune.json").read_text())["export"]
    check = export["logit_check"]
    assert export["architecture"] == architecture and (out / GGUF_NAME).is_file()
    assert check["probe_tokens"] == PROBE_TOKENS
    assert check["passed"]
    assert check["llamacpp"]["top1_agreement"] >= 0.98
    assert check["greedy"]["agreement"] >= 0.98
    assert export["parameters_after"] < 0.8 * export["parameters_before"]
