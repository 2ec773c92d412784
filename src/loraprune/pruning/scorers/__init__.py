"""Importance criteria, one scorer class each, registered by name (``--criterion``).

``lora`` is LoRAPrune's (the paper's method); ``fisher`` is the exact mask gradient of each unit,
read at the same memory; ``flap`` is FLAP's fluctuation metric, from activations only; ``grad`` (LLM-Pruner's vanilla Taylor), ``magnitude`` and ``random`` are
the baselines they are compared against. Importing this package registers them all.
"""

from loraprune.pruning.scorers import fisher, flap, gradient, lora, magnitude, random  # noqa: F401  (registers)
from loraprune.pruning.scorers.base import SCORERS, Scorer, ScoringPlan, build_scorer, register_scorer, scorer_class

__all__ = ["SCORERS", "Scorer", "ScoringPlan", "build_scorer", "register_scorer", "scorer_class"]
