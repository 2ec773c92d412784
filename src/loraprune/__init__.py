"""loraprune: LoRA-guided structured pruning of LLaMA-family language models."""

from loraprune.errors import LoraPruneError

__all__ = ["LoraPruneError"]
__version__ = "0.1.0"
