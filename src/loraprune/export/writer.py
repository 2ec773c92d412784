"""The export interface: one request, one writer per format, and the ending every export shares.

A writer refuses what its format cannot express and writes the merged model into a folder; the
rest is done here once: merge, check the written model against the trained one, record loraprune.json, rename.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn
from transformers import PreTrainedModel

from loraprune.errors import LoraPruneError
from loraprune.export.logit_check import (
    LogitCheckFailed,
    LogitComparison,
    check_failure,
    compare_logits,
    logits_of,
    probe_ids,
    rounding_noise,
    trained_model_check,
)
from loraprune.export.placement import move_into_place, temporary_folder_beside
from loraprune.export.slicing import fold_compensation, merge_lora
from loraprune.models import ArchSpec, spec_for, unwrap
from loraprune.pruning.groups import LayerShape
from loraprune.pruning.masks import ModelMasks

REPORT_NAME = "loraprune.json"


@dataclass
class ExportRequest:
    """One export: the trained model (consumed: it is merged in place), where and how to write it."""

    model: nn.Module  # as trained: LoRA adapters on (or a plain model), masks not attached
    masks: ModelMasks
    tokenizer: Any  # saved with the model; None saves none
    report: dict  # the run's report; the export adds its "export" part
    out: Path
    format: str = "transformers"
    overwrite: bool = False
    check_logits: bool = True  # False: a failed check is recorded in loraprune.json, not raised
    probe: torch.Tensor | None = None  # (1, tokens) the logits are compared on; real text conditions it best
    gguf_type: str = "f32"  # weights of a GGUF file: f32, f16 or q8_0
    source_gguf: Path | None = None  # the GGUF file the model was loaded from: its tokenizer keys are copied
    threads: int | None = None  # llama.cpp threads of the GGUF check
    repetition_penalty: float | None = None  # the decoding default written with the model; None: the base's

    spec: ArchSpec = field(init=False)  # where its layers and projections are
    shape: LayerShape = field(init=False)  # its unpruned layer widths (slicing changes the config: read first)

    def __post_init__(self) -> None:
        self.spec = spec_for(unwrap(self.model).config)
        self.shape = LayerShape.from_config(unwrap(self.model).config)


@dataclass(frozen=True)
class TrainedLogits:
    """What the written model is checked against, measured before the merge."""

    probe: torch.Tensor  # (1, tokens)
    trained: torch.Tensor  # the masked model with its adapters, in its own arithmetic (a quantised base too)
    merged: torch.Tensor  # the masked model after the merge
    rounding: LogitComparison  # what rounding alone moves the trained model's logits by
    dtype: torch.dtype  # the trained model's: the written model is read back in it


@dataclass
class WrittenModel:
    """What a writer hands back: its part of the report and the written model's logits on the probe."""

    summary: dict
    logits: torch.Tensor  # as the format's runtime computes them, (1, tokens, vocabulary)
    floors: dict[str, LogitComparison] = field(default_factory=dict)  # rounding the format adds (a weight type)
    comparisons: dict = field(default_factory=dict)  # the runtime's own comparisons, recorded with the check


class ExportWriter:
    """Writes one format: refuses what it cannot express, then writes the merged model into a folder."""

    name: ClassVar[str]
    checked: ClassVar[str] = "the exported model's logits"  # what a failed check names
    advice: ClassVar[str] = "Please report this"

    def refuse(self, request: ExportRequest) -> None:
        """Raise, before anything is written, what this format cannot hold."""

    def write(self, merged: PreTrainedModel, request: ExportRequest, reference: TrainedLogits,
              folder: Path) -> WrittenModel:
        """Write ``merged`` (masks not attached; it may be sliced in place) into the empty ``folder``."""
        raise NotImplementedError

    def model_card(self, report: dict) -> str | None:
        """README.md of the written folder, or None for none."""
        return None


WRITERS: dict[str, type[ExportWriter]] = {}
WriterType = TypeVar("WriterType", bound=type[ExportWriter])


def register_writer(name: str) -> Callable[[WriterType], WriterType]:
    """Class decorator: make a writer available as ``--format name``."""
    def register(cls: WriterType) -> WriterType:
        cls.name = name
        WRITERS[name] = cls
        return cls
    return register


def writer_for(export_format: str) -> ExportWriter:
    """The registered writer of a format name."""
    if export_format not in WRITERS:
        raise LoraPruneError(f"--format must be one of {', '.join(WRITERS)}, got {export_format!r}")
    return WRITERS[export_format]()


def export_model(request: ExportRequest) -> Path:
    """Write ``request.model`` in its format to ``request.out``, checked before it is put in place."""
    writer = writer_for(request.format)
    writer.refuse(request)
    out = Path(request.out)
    if out.exists() and not request.overwrite:
        raise LoraPruneError(f"{out} exists; pass --overwrite or choose another --out")
    tmp = temporary_folder_beside(out)
    try:
        merged, reference = merged_with_reference(request)
        if request.repetition_penalty is not None and getattr(merged, "generation_config", None) is not None:
            merged.generation_config.repetition_penalty = request.repetition_penalty  # 1.0 too: over the base's
        source = {"source_architecture": type(merged).__name__, "parameters_before": merged.num_parameters()}
        written = writer.write(merged, request, reference, tmp)
        check = logit_check(written, reference)
        report = {**request.report, "export": {**source, **written.summary, "logit_check": check}}
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
        card = writer.model_card(report)
        if card is not None:
            (tmp / "README.md").write_text(card)
        if request.check_logits and not check["passed"]:
            raise LogitCheckFailed(check_failure(writer.checked, check, writer.advice))
        move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def merged_with_reference(request: ExportRequest) -> tuple[PreTrainedModel, TrainedLogits]:
    """The trained model's logits on the probe (masked, adapters on), then the model merged."""
    model, masks, spec = request.model, request.masks, request.spec
    model.eval()
    probe = request.probe if request.probe is not None else probe_ids(unwrap(model).config.vocab_size)
    dtype = unwrap(model).dtype
    masks.attach(model, spec)
    trained = logits_of(model, probe)
    rounding = rounding_noise(model, probe, reference=trained)
    masks.detach()
    merged = merge_lora(model)
    masks.attach(merged, spec)
    merged_logits = logits_of(merged, probe)
    masks.detach()
    if masks.means is not None:  # bias compensation: removed units' mean outputs become biases
        fold_compensation(merged, masks, spec)
    return merged, TrainedLogits(probe, trained, merged_logits, rounding, dtype)


def logit_check(written: WrittenModel, reference: TrainedLogits) -> dict:
    """The written model against the trained one; the merge's own drift reported beside it."""
    check = trained_model_check(written.logits, reference.trained, {"rounding_noise": reference.rounding,
                                                                    **written.floors})
    return {"probe_tokens": int(reference.probe.numel()), **check, **written.comparisons,
            "merge": compare_logits(reference.merged, reference.trained).to_dict()}
