"""The one contract every importance criterion fulfils, and the registry that names them.

A scorer is built once per run from the config and attached to the model. After each optimizer
step's backward pass(es) the recipe asks it for ``step_scores()``: one float32 score per attention
unit and FFN channel of every pruned layer, on the model's device. What a scorer needs (∇W of the
frozen weights, a backward pass at all, activation hooks) it declares; nobody branches on its name.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import torch
from torch import nn

from loraprune.config import PruneConfig
from loraprune.errors import LoraPruneError
from loraprune.models import ArchSpec, decoder_layers
from loraprune.pruning.groups import AttentionUnit, LayerShape
from loraprune.pruning.scores import LayerScores


@dataclass(frozen=True)
class ScoringPlan:
    """What is scored: which layers of which architecture, at which attention granularity."""

    spec: ArchSpec
    shape: LayerShape
    unit: AttentionUnit
    pruned_layers: tuple[int, ...]


class Scorer:
    """Importance of every prunable unit, one step at a time."""

    name: ClassVar[str]
    needs_weight_gradients: ClassVar[bool] = False  # ∇W of frozen projections: their memory too
    needs_backward: ClassVar[bool] = True  # False: no gradients needed
    needs_forward: ClassVar[bool] = False  # True (without a backward): scores come from activations
    # True: the scorer reads activation gradients only, so a separate scoring loss can be
    # differentiated with respect to them (``recording_inputs``) while another loss trains; see
    # ``ignoring_backward``.
    takes_scoring_loss: ClassVar[bool] = False

    def __init__(self, config: PruneConfig, plan: ScoringPlan):
        self.config = config
        self.plan = plan
        self.layers: nn.ModuleList | None = None

    def attach(self, model: nn.Module) -> None:
        """Start observing ``model`` (the adapted model); hook-based scorers register hooks here."""
        self.layers = decoder_layers(model, self.plan.spec)

    def detach(self) -> None:
        """Stop observing the model and remove any hooks."""
        self.layers = None

    def step_scores(self) -> dict[int, LayerScores]:
        """This step's scores of every pruned layer, read after the step's backward pass(es)."""
        raise NotImplementedError

    def compensate_with(self, means: list | None) -> None:
        """Bias compensation replaces a removed unit by its running mean (``ModelMasks.means``); a
        scorer that can measure removal as that replacement takes the means here. Default: ignored."""

    def ignoring_backward(self) -> AbstractContextManager[None]:
        """A block whose backward passes this scorer does not read (the training loss, when it scores another)."""
        return nullcontext()

    def recording_inputs(self) -> AbstractContextManager[list[torch.Tensor]]:
        """A block that collects the activations the scorer reads in its forward passes (``takes_scoring_loss``)."""
        raise NotImplementedError(f"the {self.name} criterion scores the training step's own gradients")

    def _attached_layers(self) -> nn.ModuleList:
        if self.layers is None:
            raise RuntimeError(f"the {self.name} scorer must be attached to a model before scoring")
        return self.layers


SCORERS: dict[str, type[Scorer]] = {}
ScorerType = TypeVar("ScorerType", bound=type[Scorer])


def register_scorer(name: str) -> Callable[[ScorerType], ScorerType]:
    """Class decorator: make a scorer available as ``--criterion name``."""
    def register(cls: ScorerType) -> ScorerType:
        cls.name = name
        SCORERS[name] = cls
        return cls
    return register


def scorer_class(criterion: str) -> type[Scorer]:
    """The registered scorer class of a criterion name (its memory needs are class attributes)."""
    if criterion not in SCORERS:
        raise LoraPruneError(f"--criterion must be one of {', '.join(sorted(SCORERS))}, got '{criterion}'")
    return SCORERS[criterion]


def build_scorer(config: PruneConfig, plan: ScoringPlan) -> Scorer:
    """The scorer ``config.criterion`` names, built for ``plan``."""
    return scorer_class(config.criterion)(config, plan)
