"""Importance criteria, one scorer class each, registered by name (``--criterion``).

``lora`` is LoRAPrune's; ``grad`` (LLM-Pruner's vanilla Taylor), ``magnitude`` and ``random`` are
the baselines it is compared against. Importing this package registers them all.
"""

from loraprune.pruning.scorers import gradient, lora, magnitude, random  # noqa: F401  (registers)
from loraprune.pruning.scorers.base import SCORERS, Scorer, ScoringPlan, build_scorer, register_scorer, scorer_class

__all__ = ["SCORERS", "Scorer", "ScoringPlan", "build_scorer", "register_scorer", "scorer_class"]
