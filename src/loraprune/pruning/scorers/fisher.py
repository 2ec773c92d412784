"""Mask-gradient (empirical Fisher) importance, read during LoRA's own backward pass.

Put a mask m = 1 on every unit's output, at the input of o_proj (per query head) and of down_proj
(per FFN channel). Then ∂L/∂m_g = Σ_tokens ⟨∂L/∂a_g, a_g⟩ = Σ_{i,j∈g} ∇W_ij·W_ij over the unit's
o/down columns: the exact first-order loss change of removing the unit. Autograd computes ∂L/∂a
anyway while training LoRA; a tensor hook reads it. The squares of per-sequence values, summed, are
an empirical-Fisher estimate of the loss increase (Kwon et al. 2022; Molchanov et al. 2019).
Memory: one float per unit, plus the unit outputs of a micro-batch kept until its backward.
With bias compensation a removed unit is replaced by its mean, not by zero, so the loss change of
removing it is Σ ⟨∂L/∂a_g, a_g − mean_g⟩: ``compensate_with`` gives the scorer the running means.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.hooks import RemovableHandle

from loraprune.config import PruneConfig
from loraprune.pruning.scorers.base import Scorer, ScoringPlan, register_scorer
from loraprune.pruning.scores import LayerScores


def per_sequence_mask_gradients(activation: torch.Tensor, gradient: torch.Tensor, width: int,
                                window: int | None = None) -> torch.Tensor:
    """∂L/∂m per sequence (or window of ``window`` tokens) and unit: Σ of a·∂L/∂a over its tokens and features.

    activation, gradient: (batch, tokens, units · width) → (batch · windows, units), float32.
    """
    batch, tokens, features = activation.shape
    products = activation.float() * gradient.float()
    per_token = products.view(batch, tokens, features // width, width).sum(dim=3)
    if window is None or window >= tokens:
        return per_token.sum(dim=1)
    padding = -tokens % window  # zeros add nothing to a window's sum
    per_token = torch.nn.functional.pad(per_token, (0, 0, 0, padding))
    return per_token.view(batch, -1, window, features // width).sum(dim=2).flatten(0, 1)


@register_scorer("fisher")
class FisherScorer(Scorer):
    """Σ over sequences of (∂L/∂m_unit)², a unit's mask gradient; no ∇W, no per-weight state."""

    takes_scoring_loss = True

    def __init__(self, config: PruneConfig, plan: ScoringPlan):
        super().__init__(config, plan)
        self._handles: list[RemovableHandle] = []
        self._attention: dict[int, torch.Tensor] = {}  # layer → (units,) sum of squares this step
        self._ffn: dict[int, torch.Tensor] = {}
        self._reading = True  # False while a backward pass that is not to be scored runs
        self._means: list | None = None  # per layer LayerMeans, with bias compensation
        self._recorded: list[torch.Tensor] | None = None  # hooked activations, inside ``recording_inputs``

    def compensate_with(self, means: list | None) -> None:
        """Score removal as replacement by these running means (``ModelMasks.means``) instead of by zero."""
        self._means = means

    def attach(self, model: nn.Module) -> None:
        """Hook the inputs of o_proj and down_proj of every pruned layer."""
        super().attach(model)
        spec = self.plan.spec
        for index in self.plan.pruned_layers:
            layer = self.layers[index]
            o_proj = getattr(getattr(layer, spec.attention), spec.o_proj)
            down_proj = getattr(getattr(layer, spec.mlp), spec.down_proj)
            self._handles.append(o_proj.register_forward_pre_hook(self._observer(index, "attention")))
            self._handles.append(down_proj.register_forward_pre_hook(self._observer(index, "ffn")))

    def detach(self) -> None:
        """Remove the hooks and forget anything not yet returned."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._attention.clear()
        self._ffn.clear()
        super().detach()

    @contextmanager
    def ignoring_backward(self) -> Iterator[None]:
        """Backward passes inside the block leave the scores as they are."""
        self._reading = False
        try:
            yield
        finally:
            self._reading = True

    @contextmanager
    def recording_inputs(self) -> Iterator[list[torch.Tensor]]:
        """The hooked activations of the forward passes inside the block.

        A scoring loss differentiated with respect to them (``torch.autograd.grad``) reaches every
        hook and nothing else: no adapter gradient, and no sharded parameter, which FSDP2 keeps out
        of the graph.
        """
        self._recorded = []
        try:
            yield self._recorded
        finally:
            self._recorded = None

    def step_scores(self) -> dict[int, LayerScores]:
        """This step's sums of squared per-sequence mask gradients; the sums start again from zero."""
        if not self._attention or not self._ffn:
            raise RuntimeError("the fisher criterion saw no backward pass through the hooked layers: "
                               "score after a backward pass of the attached model")
        scores = {}
        for index in self.plan.pruned_layers:
            attention, ffn = self._attention.pop(index), self._ffn.pop(index)
            if dist.is_available() and dist.is_initialized():  # every process saw its own sequences
                dist.all_reduce(attention)
                dist.all_reduce(ffn)
                # A process's loss averages its share of the batch only, so its per-sequence
                # gradients are world_size times those of the whole batch's mean loss: rescale, and
                # the scores equal a single-process run's on the same global batch.
                attention /= dist.get_world_size() ** 2
                ffn /= dist.get_world_size() ** 2
            scores[index] = LayerScores(attention, ffn)
        return scores

    def _observer(self, index: int, kind: str):
        shape, window = self.plan.shape, self.config.fisher_window

        def read_gradient(gradient: torch.Tensor, activation: torch.Tensor) -> None:
            if not self._reading:
                return
            if self._means is not None:
                unit_means = getattr(self._means[index], "ffn" if kind == "ffn" else "attention")
                activation = activation.float() - unit_means.mean()
            if kind == "ffn":
                per_sequence = per_sequence_mask_gradients(activation, gradient, 1, window)
            else:
                per_sequence = per_sequence_mask_gradients(activation, gradient, shape.head_dim, window)
                if self.plan.unit == "kv_group":  # a KV group goes with all its query heads at once
                    per_sequence = per_sequence.view(-1, shape.num_kv_heads, shape.queries_per_kv).sum(dim=2)
            store = self._ffn if kind == "ffn" else self._attention
            squares = per_sequence.square().sum(dim=0)
            store[index] = store[index] + squares if index in store else squares

        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            activation = inputs[0]
            if activation.requires_grad:  # not under no_grad (evaluation, a distillation teacher)
                values = activation.detach()  # the hook must not hold the tensor it is registered on
                activation.register_hook(lambda gradient: read_gradient(gradient, values))
                if self._recorded is not None:
                    self._recorded.append(activation)

        return hook
