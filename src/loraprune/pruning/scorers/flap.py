"""FLAP's fluctuation metric (An et al. 2024): how much a unit's output varies, weighted by where it goes.

For each input feature j of o_proj / down_proj: Var_tokens(x_j) · ‖W[:, j]‖², the energy of the
part of the output that a constant (the feature's mean, kept by bias compensation) cannot stand in
for. A head sums its features, a KV group its heads. Scores are then standardised across all pruned
layers, attention and FFN apart (FLAP's "AL-AM" structure), so the two kinds and every layer
compete on one scale. No backward pass: forward hooks keep a sum and a sum of squares per feature.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.hooks import RemovableHandle

from loraprune.config import PruneConfig
from loraprune.pruning.scorers.base import Scorer, ScoringPlan, register_scorer
from loraprune.pruning.scorers.weights import effective_weight
from loraprune.pruning.scores import LayerScores
from loraprune.pruning.target import UnitSizes


class FeatureMoments:
    """Running count, sum and sum of squares of every feature of an activation (float64)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.count, self.sums, self.squares = 0, None, None

    @torch.no_grad()
    def add(self, activation: torch.Tensor) -> None:
        flat = activation.detach().reshape(-1, activation.shape[-1]).double()
        if self.sums is None:
            self.sums, self.squares = torch.zeros_like(flat[0]), torch.zeros_like(flat[0])
        self.count += flat.shape[0]
        self.sums += flat.sum(dim=0)
        self.squares += flat.square().sum(dim=0)

    def all_reduce(self) -> None:
        """Sum the moments of every process (each saw its own share of the batch)."""
        count = torch.tensor(float(self.count), dtype=torch.float64, device=self.sums.device)
        for tensor in (count, self.sums, self.squares):
            dist.all_reduce(tensor)
        self.count = count

    def variance(self) -> torch.Tensor:
        """(features,) population variance over the tokens seen."""
        mean = self.sums / self.count
        return (self.squares / self.count - mean.square()).clamp_min(0)


def standardised(values: list[torch.Tensor]) -> list[torch.Tensor]:
    """(v − mean) / std over the concatenation of ``values``, returned in the same pieces."""
    joined = torch.cat(values)
    scaled = (joined - joined.mean()) / joined.std().clamp_min(torch.finfo(joined.dtype).tiny)
    return list(scaled.split([v.numel() for v in values]))


@register_scorer("flap")
class FlapScorer(Scorer):
    """Fluctuation × squared column norm, standardised; reads forward activations only."""

    needs_backward = False
    needs_forward = True

    def __init__(self, config: PruneConfig, plan: ScoringPlan):
        super().__init__(config, plan)
        self._handles: list[RemovableHandle] = []
        self._moments: dict[tuple[int, str], FeatureMoments] = {}

    def attach(self, model: nn.Module) -> None:
        """Hook the inputs of o_proj and down_proj of every pruned layer."""
        super().attach(model)
        spec = self.plan.spec
        for index in self.plan.pruned_layers:
            layer = self.layers[index]
            for kind, module in (("attention", getattr(getattr(layer, spec.attention), spec.o_proj)),
                                 ("ffn", getattr(getattr(layer, spec.mlp), spec.down_proj))):
                moments = self._moments.setdefault((index, kind), FeatureMoments())
                self._handles.append(module.register_forward_pre_hook(
                    lambda _module, inputs, moments=moments: moments.add(inputs[0])))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._moments.clear()
        super().detach()

    def step_scores(self) -> dict[int, LayerScores]:
        """Standardised fluctuation scores of the tokens seen since the last call, shifted to be positive
        and multiplied by each unit's parameters, so that ranking by score per parameter removed (global
        allocation) ranks by the standardised score, as FLAP's threshold does."""
        if any(m.sums is None for m in self._moments.values()):
            raise RuntimeError("the flap criterion saw no forward pass through the hooked layers")
        shape, spec, layers = self.plan.shape, self.plan.spec, self._attached_layers()
        if dist.is_available() and dist.is_initialized():
            for moments in self._moments.values():
                moments.all_reduce()
        attention, ffn = [], []
        for index in self.plan.pruned_layers:
            o_proj = getattr(getattr(layers[index], spec.attention), spec.o_proj)
            down_proj = getattr(getattr(layers[index], spec.mlp), spec.down_proj)
            o_columns = effective_weight(o_proj).float().square().sum(dim=0).double()  # (heads · head_dim,)
            down_columns = effective_weight(down_proj).float().square().sum(dim=0).double()
            per_feature = self._moments[(index, "attention")].variance() * o_columns
            per_head = per_feature.view(shape.num_heads, shape.head_dim).sum(dim=1)
            if self.plan.unit == "kv_group":
                per_head = per_head.view(shape.num_kv_heads, shape.queries_per_kv).sum(dim=1)
            attention.append(per_head)
            ffn.append(self._moments[(index, "ffn")].variance() * down_columns)
        for moments in self._moments.values():
            moments.reset()
        sizes = UnitSizes.of(shape, self.plan.unit, False, False)
        attention, ffn = standardised(attention), standardised(ffn)
        lowest = torch.minimum(torch.cat(attention).min(), torch.cat(ffn).min())  # no host read-back
        device = next(layers.parameters()).device
        return {index: LayerScores(((a - lowest + 1e-3) * sizes.attention_unit).float().to(device),
                                   ((f - lowest + 1e-3) * sizes.ffn_channel).float().to(device))
                for index, a, f in zip(self.plan.pruned_layers, attention, ffn)}
