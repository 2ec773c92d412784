"""What memory_at_scale.py measures: LLaMA-7B's layer shapes, the layer counts, the modes, the paper's figures.

Read by the measurement (memory_at_scale.py) and by the docs it writes (memory_at_scale_docs.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

LLAMA_7B_SHAPES = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
                   "num_key_value_heads": 32, "vocab_size": 32000}
LAYER_COUNTS = (2, 4)
EXTRAPOLATE_TO = 32
# LoRAPrune paper, Table 8 (LLaMA-7B, one GPU): vanilla gradient criterion, LoRAPrune, LoRAPrune 8-bit.
PAPER_GB = {"grad": 38.6, "lora": 18.3, "lora 8-bit": 13.8}


@dataclass(frozen=True)
class Mode:
    """One measured configuration: PruneConfig settings plus the frozen base's precision."""

    settings: dict = field(default_factory=dict)  # empty: plain LoRA fine-tuning under full masks
    dtype: str = "float32"
    base_bits: int | None = None

    @property
    def prunes(self) -> bool:
        return "criterion" in self.settings


def _modes() -> dict[str, Mode]:
    modes: dict[str, Mode] = {}
    for distill in (False, True):
        extra = {"distill": 0.5} if distill else {}
        suffix = "+distill" if distill else ""
        modes[f"finetune{suffix}"] = Mode(dict(extra))
        for criterion in ("lora", "fisher", "grad"):
            modes[f"{criterion}{suffix}"] = Mode({"criterion": criterion, **extra})
    for criterion in ("finetune", "lora", "fisher", "grad"):
        settings = {} if criterion == "finetune" else {"criterion": criterion}
        modes[f"{criterion}@bf16"] = Mode(settings, dtype="bfloat16")
    for criterion in ("finetune", "lora", "fisher"):  # grad needs ∇W, which a quantised base has not
        settings = {} if criterion == "finetune" else {"criterion": criterion}
        modes[f"{criterion}@int8"] = Mode(settings, base_bits=8)
    return modes


MODES = _modes()
