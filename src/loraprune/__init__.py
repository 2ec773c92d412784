"""loraprune: LoRA-guided structured pruning of LLaMA-family language models.

``loraprune.prune(PruneConfig(...), out)`` is the whole job; the CLI makes the same call.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from loraprune.config import LoraSettings, PruneConfig
from loraprune.errors import LoraPruneError

if TYPE_CHECKING:
    from loraprune.job import PruneResult

__all__ = ["LoraPruneError", "LoraSettings", "PruneConfig", "prune"]
__version__ = "0.1.0"


def prune(config: PruneConfig | None = None, out: str | Path | None = None, **options) -> PruneResult:
    """Prune while fine-tuning LoRA and export the smaller model (see :func:`loraprune.job.prune`)."""
    from loraprune import job  # torch and transformers load only when needed

    return job.prune(config, out, **options)
