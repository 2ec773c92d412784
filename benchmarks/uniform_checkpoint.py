"""Write a SmolLM2 checkpoint pruned by fixed uniform masks, for speed benchmarks without a run.

Keeps the first kv groups / query heads / FFN channels of every layer; quality is not the point.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from loraprune.export import ExportRequest, export_model
from loraprune.models.loading import load_model
from loraprune.pruning.groups import LayerShape
from loraprune.pruning.masks import LayerMask, ModelMasks


def uniform_masks(shape: LayerShape, num_layers: int, kv_groups: int, queries_per_group: int,
                  ffn: int) -> ModelMasks:
    """Masks keeping the first units of every layer."""
    heads = torch.zeros(shape.num_kv_heads, shape.queries_per_kv, dtype=torch.bool)
    heads[:kv_groups, :queries_per_group] = True
    channels = torch.zeros(shape.intermediate_size, dtype=torch.bool)
    channels[:ffn] = True
    return ModelMasks([LayerMask(heads.flatten().clone(), channels.clone()) for _ in range(num_layers)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--kv-groups", type=int, required=True)
    parser.add_argument("--queries-per-group", type=int, required=True)
    parser.add_argument("--ffn", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    model, tokenizer = load_model(args.model)
    shape = LayerShape.from_config(model.config)
    masks = uniform_masks(shape, model.config.num_hidden_layers, args.kv_groups,
                          args.queries_per_group, args.ffn)
    report = {"model": args.model, "method": "fixed uniform masks (benchmarks/uniform_checkpoint.py)"}
    out = export_model(ExportRequest(model, masks, tokenizer, report, args.out, overwrite=args.overwrite))
    print(out)


if __name__ == "__main__":
    main()
