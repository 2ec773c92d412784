"""Every knob of a pruning run, with defaults from the LoRAPrune paper.

One dataclass per concern; ``PruneConfig`` gathers them and is what a run folder records.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from loraprune.errors import LoraPruneError

Criterion = Literal["lora", "fisher", "flap", "grad", "magnitude", "random"]
CRITERIA: tuple[str, ...] = ("lora", "fisher", "flap", "grad", "magnitude", "random")
ALLOCATIONS: tuple[str, ...] = ("auto", "uniform", "global")
EXPORT_FORMATS: tuple[str, ...] = ("transformers", "gguf", "nemotron-nas")
# --gguf-type choices (the types themselves: export/gguf_types.py; a test checks both agree).
GGUF_TYPE_NAMES: tuple[str, ...] = ("f32", "f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")
# Flat setting names (the CLI's) that belong to the LoRA part of the config.
LORA_FLAGS = {"lora_rank": "rank", "lora_alpha": "alpha", "lora_dropout": "dropout"}


@dataclass
class LoraSettings:
    """The LoRA adapters fine-tuned while pruning (paper: rank 8 on every projection)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = (
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class PruneConfig:
    """A whole pruning run: what to prune, how much, by which criterion and schedule."""

    model: str = "smollm2-135m"
    data: str = "pydoc"
    austen_dir: str | None = None  # where the Austen novels are, when data is "austen"
    # Tokens the dense model samples for --data self / NAME+self; None: one block per training sample
    # drawn from it (steps × batch × grad-accumulation × processes, half of them when mixed).
    self_tokens: int | None = None
    # Text the units are scored on, when it should differ from the recovery text: corpora joined by
    # "+" (e.g. "austen+pydoc", alternating block by block). Which units survive follows the scoring
    # text, so it should cover everything the pruned model must keep doing; None scores on --data.
    calibration: str | None = None
    # Score the --calibration text on every k-th step of the ramp only: its scoring pass is a forward and
    # a backward more, so 2 halves that cost (and the samples --calibration self draws); scores hold between.
    calibration_every: int = 1
    dtype: str = "float32"
    base_bits: int | None = None  # 8 or 4: the frozen projections quantised (bitsandbytes); None: dtype

    # Target: fraction of the whole model's parameters (embeddings included) to remove.
    sparsity: float = 0.5
    attention_unit: Literal["kv_group", "query_head"] = "kv_group"
    attention_fraction: float | None = None  # share of attention units removed; None balances
    skip_first_layers: int = 0
    skip_last_layers: int = 0
    # Kept FFN widths are multiples of this; None: what the export needs (GGUF q4_0/q8_0: 32, K-quants: 256, else 1).
    round_to: int | None = None
    # uniform: every pruned layer keeps the same widths (one transformers config); global: units of
    # all layers compete on score per parameter, so each layer keeps its own widths (GGUF deci, vLLM
    # nemotron-nas). auto: global when the export format holds per-layer widths, else uniform.
    allocation: Literal["auto", "uniform", "global"] = "auto"
    # Global allocation only: no pruned layer loses more than this share of its attention and FFN
    # parameters (None: a layer may narrow to one attention unit and round-to FFN channels).
    max_layer_sparsity: float | None = None

    # Importance (paper Eqs. 8-11).
    criterion: Criterion = "fisher"  # chosen by benchmarks/quality.py; "lora" is the paper's
    score_power: Literal["square", "abs"] = "square"
    normalise_scores: bool = True
    lora_columns: bool = True  # lora also scores o_proj/down_proj columns, as the paper; False: rows only
    ema: float = 0.9
    # fisher: square the mask gradient of every window of this many tokens, not of whole sequences,
    # so a unit that matters much to a few tokens is not averaged away by the rest (None: sequences).
    fisher_window: int | None = None

    # Recovery loss: weight w of self-distillation from the unpruned base (0: cross-entropy only).
    distill: float = 0.0
    distill_temperature: float = 1.0
    distill_top_k: int | None = None  # KL over the teacher's k likeliest tokens only, renormalised
    # FLAP's bias compensation: a removed unit's mean output (over the training tokens it saw while
    # kept) stays, folded into the bias of o_proj / down_proj on export.
    bias_compensation: bool = False

    # Schedule (paper Sec. 3.3: cubic ramp, masks updated every k steps, then recovery). The ramp ends at
    # half time, not at the paper's nine tenths: chosen by benchmarks/quality.py (rows /cool:F), see the README.
    steps: int = 200
    warmup_fraction: float = 0.1
    cooldown_fraction: float = 0.5
    prune_every: int = 10

    # Optimisation.
    lr: float = 8e-4  # chosen on SmolLM2 by benchmarks/quality.py (rows fisher+global/lr:*), see the README
    lr_schedule: Literal["linear", "cosine", "constant"] = "linear"
    weight_decay: float = 0.0
    batch_size: int = 1
    grad_accumulation: int = 1
    seq_len: int = 256
    max_grad_norm: float = 1.0
    seed: int = 0
    lora: LoraSettings = field(default_factory=LoraSettings)

    # Several processes (torchrun / accelerate launch): "replicate" keeps the whole model in each
    # (data parallel); "fsdp" shards every weight across them (FSDP2), for models one device cannot hold.
    parallel: Literal["replicate", "fsdp"] = "replicate"

    # What the run writes when it ends, recorded so that --resume and `loraprune export` finish it
    # the same way: the format, the GGUF weight type (None: f32; only with gguf), or no model at all.
    export: bool = True
    export_format: Literal["transformers", "gguf", "nemotron-nas"] = "transformers"
    gguf_type: str | None = None  # one of GGUF_TYPE_NAMES
    # The decoding default written with the model (generation_config.json, GGUF general.sampling.penalty_repeat):
    # None measures the mildest repetition penalty that stops its loops; 1.0 ships none (over one the base sets).
    repetition_penalty: float | None = None

    # Bookkeeping (does not change the result).
    eval_tokens: int = 16384
    eval_seq_len: int = 512
    save_every: int = 50

    def validate(self) -> None:
        """Raise LoraPruneError for any value that cannot work, naming the flag to fix."""
        if not 0.0 < self.sparsity < 1.0:
            raise LoraPruneError(f"--sparsity must be between 0 and 1 (exclusive), got {self.sparsity}")
        if self.criterion not in CRITERIA:
            raise LoraPruneError(f"--criterion must be one of {', '.join(CRITERIA)}, got '{self.criterion}'")
        if self.attention_unit not in ("kv_group", "query_head"):
            raise LoraPruneError("--attention-unit must be kv_group or query_head")
        if self.allocation not in ALLOCATIONS:
            raise LoraPruneError(f"--allocation must be one of {', '.join(ALLOCATIONS)}, got '{self.allocation}'")
        if self.attention_fraction is not None and not 0.0 <= self.attention_fraction < 1.0:
            raise LoraPruneError("--attention-fraction must be in [0, 1)")
        positive = {"steps": self.steps, "prune-every": self.prune_every, "batch-size": self.batch_size,
                    "grad-accumulation": self.grad_accumulation, "seq-len": self.seq_len,
                    "round-to": 1 if self.round_to is None else self.round_to, "eval-tokens": self.eval_tokens,
                    "eval-seq-len": self.eval_seq_len, "save-every": self.save_every, "lora-rank": self.lora.rank,
                    "calibration-every": self.calibration_every}
        for flag, value in positive.items():
            if value <= 0:
                raise LoraPruneError(f"--{flag} must be a positive integer, got {value}")
        if self.fisher_window is not None and self.fisher_window <= 0:
            raise LoraPruneError(f"--fisher-window must be a positive number of tokens, got {self.fisher_window}")
        if self.fisher_window is not None and self.criterion != "fisher":
            raise LoraPruneError(f"--fisher-window sets how the fisher criterion squares its mask gradients; "
                                 f"--criterion {self.criterion} has none: drop it or use --criterion fisher")
        if self.max_layer_sparsity is not None:
            if not 0.0 < self.max_layer_sparsity <= 1.0:
                raise LoraPruneError(f"--max-layer-sparsity must be in (0, 1], got {self.max_layer_sparsity}")
            if self.allocation == "uniform":
                raise LoraPruneError("--max-layer-sparsity caps global allocation; uniform allocation prunes every "
                                     "layer alike already: drop one of the two")
        if self.skip_first_layers < 0 or self.skip_last_layers < 0:
            raise LoraPruneError("--skip-first and --skip-last must be ≥ 0")
        if self.repetition_penalty is not None and not 1.0 <= self.repetition_penalty <= 2.0:
            raise LoraPruneError(f"--repetition-penalty must be auto, off or a number from 1 to 2, "
                                 f"got {self.repetition_penalty}")
        if not 0.0 <= self.ema < 1.0:
            raise LoraPruneError(f"--ema must be in [0, 1), got {self.ema}")
        if not (0.0 <= self.warmup_fraction < 1.0 and 0.0 <= self.cooldown_fraction < 1.0
                and self.warmup_fraction + self.cooldown_fraction < 1.0):
            raise LoraPruneError("--warmup and --cooldown must be ≥ 0 with warmup + cooldown < 1")
        if not 0.0 <= self.distill <= 1.0:
            raise LoraPruneError(f"--distill must be a weight in [0, 1], got {self.distill}")
        if self.distill_temperature <= 0:
            raise LoraPruneError(f"--distill-temperature must be positive, got {self.distill_temperature}")
        if self.distill_top_k is not None and self.distill_top_k < 2:
            raise LoraPruneError(f"--distill-top-k must be at least 2 tokens, got {self.distill_top_k}")
        if self.parallel not in ("replicate", "fsdp"):
            raise LoraPruneError(f"--parallel must be replicate or fsdp, got '{self.parallel}'")
        if self.calibration is not None:
            self._validate_calibration()
        elif self.calibration_every != 1:
            raise LoraPruneError("--calibration-every needs --calibration (without it every step of the ramp "
                                 "scores its own training text, at no extra cost)")
        if self.base_bits not in (None, 8, 4):
            raise LoraPruneError(f"--base-bits must be 8 or 4, got {self.base_bits}")
        if self.lr <= 0:
            raise LoraPruneError(f"--lr must be positive, got {self.lr}")
        if self.export_format not in EXPORT_FORMATS:
            raise LoraPruneError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, got {self.export_format!r}")
        if self.gguf_type is not None and self.export_format != "gguf":
            raise LoraPruneError(f"--gguf-type needs --format gguf (this run writes {self.export_format}); "
                                 "drop --gguf-type or add --format gguf")
        if self.self_tokens is not None and self.self_tokens <= 0:
            raise LoraPruneError(f"--self-tokens must be a positive number of tokens, got {self.self_tokens}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        d = asdict(self)
        d["lora"]["target_modules"] = list(self.lora.target_modules)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PruneConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        d = dict(d)
        lora = dict(d.pop("lora", {}))
        if "target_modules" in lora:
            lora["target_modules"] = tuple(lora["target_modules"])
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise LoraPruneError(f"unknown config keys {sorted(unknown)}; the run was written by "
                                 "another loraprune version")
        return cls(**d, lora=LoraSettings(**lora))

    def with_overrides(self, overrides: dict[str, Any]) -> PruneConfig:
        """A copy with some settings replaced; ``lora_rank``/``lora_alpha``/``lora_dropout`` reach the LoRA part."""
        d = self.to_dict()
        for key, value in overrides.items():
            if key in LORA_FLAGS:
                d["lora"][LORA_FLAGS[key]] = value
            else:
                d[key] = value
        return PruneConfig.from_dict(d)

    def _validate_calibration(self) -> None:
        from loraprune.pruning.scorers import scorer_class  # the scorers import this module

        sources = calibration_sources(self.calibration)
        if not all(sources) or sources.count("self") > 1:
            raise LoraPruneError(f"--calibration {self.calibration!r}: name corpora or self joined by '+', "
                                 "e.g. austen+pydoc or austen+self")
        if not scorer_class(self.criterion).takes_scoring_loss:
            raise LoraPruneError(f"--calibration needs a criterion that scores a separate pass (fisher); "
                                 f"--criterion {self.criterion} reads the training step's own gradients")

    def result_changing_differences(self, other: PruneConfig) -> list[str]:
        """Names of settings that differ and would change the pruned model."""
        # The masks and adapter do not depend on these.
        harmless = {"eval_tokens", "eval_seq_len", "save_every", "austen_dir", "parallel",
                    "export", "export_format", "gguf_type", "repetition_penalty"}
        mine, theirs = self.to_dict(), other.to_dict()
        return sorted(k for k in mine if k not in harmless and mine[k] != theirs[k])


def calibration_sources(calibration: str) -> list[str]:
    """The sources of a --calibration value (corpus names, or self), in the order their blocks alternate."""
    return calibration.split("+")

