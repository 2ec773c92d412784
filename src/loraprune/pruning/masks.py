"""Keep-masks over query heads and FFN channels, and the hooks that apply them in training.

A masked unit's output is zeroed at the input of o_proj / down_proj, so the masked model computes
exactly what the physically sliced model will compute. With bias compensation (FLAP, An et al.
2024) a masked unit outputs instead its mean over the tokens seen while it was kept, and the sliced
model carries W[:, removed] @ mean in the bias of o_proj / down_proj: the same computation again.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from loraprune.errors import LoraPruneError
from loraprune.models import ArchSpec, decoder_layers, unwrap
from loraprune.pruning.groups import LayerShape, kv_heads_kept
from loraprune.pruning.target import structure_sizes


@dataclass
class LayerMask:
    """Which query heads and FFN channels of one decoder layer are kept."""

    heads: torch.Tensor  # (num_heads,) bool
    ffn: torch.Tensor  # (intermediate_size,) bool

    def kv_heads(self, shape: LayerShape) -> torch.Tensor:
        """Kept key/value heads: those still read by a kept query head."""
        return kv_heads_kept(self.heads, shape)


@dataclass
class UnitMeans:
    """Running mean of each feature at the input of o_proj or down_proj, over tokens seen while it was kept.

    A removed feature stops counting, so its mean is frozen at the moment it was removed.
    """

    sums: torch.Tensor  # (features,) float32
    counts: torch.Tensor  # (features,) float32: tokens seen

    @classmethod
    def zeros(cls, features: int, device: torch.device | str = "cpu") -> UnitMeans:
        return cls(torch.zeros(features, device=device), torch.zeros(features, device=device))

    def mean(self) -> torch.Tensor:
        """(features,) float32; zero where nothing was seen."""
        return self.sums / self.counts.clamp_min(1)

    @torch.no_grad()
    def record(self, inputs: torch.Tensor, kept: torch.Tensor) -> None:
        """Add ``inputs`` (..., features) to the mean of the ``kept`` (features,) features."""
        flat = inputs.detach().reshape(-1, inputs.shape[-1]).float()
        self.sums += flat.sum(dim=0) * kept
        self.counts += flat.shape[0] * kept.float()

    def to(self, device: torch.device | str) -> UnitMeans:
        return UnitMeans(self.sums.to(device), self.counts.to(device))


@dataclass
class LayerMeans:
    """Compensation state of one layer: means at the input of o_proj (per feature) and of down_proj."""

    attention: UnitMeans  # (num_heads · head_dim,)
    ffn: UnitMeans  # (intermediate_size,)


@dataclass
class ModelMasks:
    """Keep-masks for every decoder layer of a model; with ``means``, removed units output their mean."""

    layers: list[LayerMask]
    means: list[LayerMeans] | None = None  # None: removed units output zero (no bias compensation)
    _hooks: list = field(default_factory=list, repr=False, compare=False)
    _suspended: list[bool] = field(default_factory=lambda: [False], repr=False, compare=False)

    @classmethod
    def full(cls, shape: LayerShape, num_layers: int, device: torch.device | str = "cpu") -> ModelMasks:
        """Masks that keep everything, on ``device`` (the model's: hooks multiply activations by them)."""
        return cls([
            LayerMask(torch.ones(shape.num_heads, dtype=torch.bool, device=device),
                      torch.ones(shape.intermediate_size, dtype=torch.bool, device=device))
            for _ in range(num_layers)
        ])

    @classmethod
    def for_model(cls, model: nn.Module) -> ModelMasks:
        """Masks that keep everything, shaped for ``model`` and on its device."""
        config = unwrap(model).config
        device = next(model.parameters()).device
        return cls.full(LayerShape.from_config(config), config.num_hidden_layers, device)

    def to(self, device: torch.device | str) -> ModelMasks:
        """Move every mask to ``device`` in place (attached hooks follow); returns self."""
        for mask in self.layers:
            mask.heads, mask.ffn = mask.heads.to(device), mask.ffn.to(device)
        if self.means is not None:
            for means in self.means:
                means.attention, means.ffn = means.attention.to(device), means.ffn.to(device)
        return self

    def compensate(self, head_dim: int) -> ModelMasks:
        """Turn on bias compensation: from now on removed units output their running mean; returns self."""
        if self.means is None:
            device = self.layers[0].heads.device
            self.means = [LayerMeans(UnitMeans.zeros(m.heads.numel() * head_dim, device),
                                     UnitMeans.zeros(m.ffn.numel(), device)) for m in self.layers]
        return self

    def kept_counts(self) -> list[dict[str, int]]:
        """Per layer: kept query heads and kept FFN channels."""
        return [{"heads": int(m.heads.sum()), "ffn": int(m.ffn.sum())} for m in self.layers]

    def attach(self, model: nn.Module, spec: ArchSpec) -> None:
        """Register forward pre-hooks that zero masked units' outputs (idempotent)."""
        self.detach()
        for index, (layer, mask) in enumerate(zip(decoder_layers(model, spec), self.layers)):
            o_proj = getattr(getattr(layer, spec.attention), spec.o_proj)
            down_proj = getattr(getattr(layer, spec.mlp), spec.down_proj)
            head_dim = o_proj.in_features // mask.heads.numel()
            means = self.means[index] if self.means is not None else None
            self._hooks.append(o_proj.register_forward_pre_hook(
                _input_mask_hook(mask, "heads", head_dim, self._suspended, means, "attention")))
            self._hooks.append(down_proj.register_forward_pre_hook(
                _input_mask_hook(mask, "ffn", 1, self._suspended, means, "ffn")))

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """Run the model unmasked inside the block (the dense teacher of self-distillation)."""
        self._suspended[0] = True
        try:
            yield
        finally:
            self._suspended[0] = False

    def detach(self) -> None:
        """Remove the hooks from the model."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensors for safetensors."""
        tensors = {}
        for i, m in enumerate(self.layers):
            tensors[f"layers.{i}.heads"] = m.heads.to(torch.uint8)
            tensors[f"layers.{i}.ffn"] = m.ffn.to(torch.uint8)
            if self.means is not None:
                for kind in ("attention", "ffn"):
                    unit_means = getattr(self.means[i], kind)
                    tensors[f"layers.{i}.{kind}_sums"] = unit_means.sums
                    tensors[f"layers.{i}.{kind}_counts"] = unit_means.counts
        return tensors

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy kept-masks in place (hooks read them live, on their own device), checking shapes match."""
        for i, m in enumerate(self.layers):
            heads, ffn = tensors.get(f"layers.{i}.heads"), tensors.get(f"layers.{i}.ffn")
            if heads is None or ffn is None or heads.shape != m.heads.shape or ffn.shape != m.ffn.shape:
                raise LoraPruneError("saved masks do not match this model's shape; "
                                     "resume or export with the model the run was started from")
            m.heads.copy_(heads.bool())
            m.ffn.copy_(ffn.bool())
        if "layers.0.attention_sums" in tensors:  # saved with bias compensation
            head_dim = tensors["layers.0.attention_sums"].numel() // self.layers[0].heads.numel()
            self.compensate(head_dim)
            for i, means in enumerate(self.means):
                for kind in ("attention", "ffn"):
                    unit_means = getattr(means, kind)
                    unit_means.sums.copy_(tensors[f"layers.{i}.{kind}_sums"])
                    unit_means.counts.copy_(tensors[f"layers.{i}.{kind}_counts"])

    def save(self, path: Path) -> None:
        """Write the masks as safetensors."""
        save_file(self.state_dict(), str(path))

    @classmethod
    def load(cls, path: Path, shape: LayerShape, num_layers: int) -> ModelMasks:
        """Read masks written by :meth:`save` for a model of the given shape."""
        masks = cls.full(shape, num_layers)
        masks.load_state_dict(load_file(str(path)))
        return masks


def _input_mask_hook(mask: LayerMask, attribute: str, repeat: int, suspended: list[bool],
                     means: LayerMeans | None = None, kind: str = ""):
    # Always multiply (by exact ones when nothing is masked): asking "is anything masked?" would
    # read the mask back to the host and stall an accelerator once per layer and forward pass.
    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]):
        if suspended[0]:
            return None
        kept = getattr(mask, attribute).repeat_interleave(repeat)
        scale = kept.to(inputs[0].dtype)
        if means is None:
            return (inputs[0] * scale,) + inputs[1:]
        unit_means = getattr(means, kind)
        if module.training:  # the means follow the training tokens; evaluation and export only read them
            unit_means.record(inputs[0], kept)
        return (inputs[0] * scale + unit_means.mean().to(inputs[0].dtype) * (1 - scale),) + inputs[1:]
    return hook


def removed_parameters(masks: ModelMasks, shape: LayerShape, attention_bias: bool, mlp_bias: bool) -> int:
    """Parameters the sliced model will have lost, counted from the masks."""
    query_head, kv_head, ffn_channel = structure_sizes(shape, attention_bias, mlp_bias)
    removed = 0
    for mask in masks.layers:
        removed += int((~mask.heads).sum()) * query_head
        removed += int((~mask.kv_heads(shape)).sum()) * kv_head
        removed += int((~mask.ffn).sum()) * ffn_channel
    return removed
