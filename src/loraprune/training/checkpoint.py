"""Save and restore everything a pruning run needs to continue bit-for-bit after a crash.

Tensors go to safetensors and the rest to JSON; nothing is unpickled from a user-supplied path.
A checkpoint is written to a temporary folder and renamed into place, so it is whole or absent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from loraprune.errors import LoraPruneError

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
TENSOR_FILES = ("adapter.safetensors", "optimizer.safetensors", "masks.safetensors", "scores.safetensors",
                "rng.safetensors")
FINGERPRINT_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "intermediate_size", "vocab_size")


def model_fingerprint(model: torch.nn.Module) -> str:
    """Identify a base model by its config and a checksum of its embedding, to catch mix-ups."""
    config = model.config.to_dict()
    # Summed in float64 without a float64 copy: at LLaMA-7B shapes the copy alone was 1 GiB.
    checksum = f"{model.get_input_embeddings().weight.detach().sum(dtype=torch.float64).item():.6e}"
    text = json.dumps({k: config.get(k) for k in FINGERPRINT_KEYS}, sort_keys=True) + checksum
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class RunState:
    """What a checkpoint holds, apart from the model and optimizer tensors."""

    step: int
    samples_seen: int
    model_fingerprint: str
    config: dict[str, Any]


def _optimizer_tensors(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, meta = {}, {"param_groups": state["param_groups"], "state": {}}
    for index, per_param in state["state"].items():
        meta["state"][str(index)] = []
        for key, value in per_param.items():
            tensors[f"{index}.{key}"] = torch.as_tensor(value).contiguous()
            meta["state"][str(index)].append(key)
    return tensors, meta


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state = {int(index): {key: tensors[f"{index}.{key}"] for key in keys}
             for index, keys in meta["state"].items()}
    return {"state": state, "param_groups": meta["param_groups"]}


@dataclass
class RngSnapshot:
    """torch, numpy and Python RNG states, split into tensors and JSON."""

    tensors: dict[str, torch.Tensor]
    meta: dict


def capture_rng() -> RngSnapshot:
    """The RNG states now, to restore later (dropout must replay identically on resume)."""
    np_state = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64))}
    if torch.cuda.is_available():  # dropout on a GPU draws from each device's own generator
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{index}"] = state
    py_state = random.getstate()
    meta = {"numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": [py_state[0], list(py_state[1]), py_state[2]]}
    return RngSnapshot(tensors, meta)


def _restore_rng(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda_keys = sorted((key for key in tensors if key.startswith("cuda.")), key=lambda key: int(key[5:]))
    if cuda_keys:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(cuda_keys):
            torch.cuda.set_rng_state_all([tensors[key] for key in cuda_keys])
        else:
            log.warning("the run was checkpointed on %d GPU(s) and resumes on another set-up; dropout "
                        "will not replay exactly as in an uninterrupted run", len(cuda_keys))
    name, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))


def save_checkpoint(run_dir: Path, state: RunState, adapter: dict[str, torch.Tensor],
                    optimizer: dict, scheduler: dict, masks: dict[str, torch.Tensor],
                    scores: dict[str, torch.Tensor], rng: RngSnapshot) -> Path:
    """Write a complete checkpoint into ``run_dir/checkpoint`` atomically."""
    final = run_dir / CHECKPOINT_DIR
    tmp = run_dir / f".{CHECKPOINT_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    optimizer_tensors, optimizer_meta = _optimizer_tensors(optimizer)
    save_file({k: v.detach().contiguous() for k, v in adapter.items()}, str(tmp / "adapter.safetensors"))
    save_file(optimizer_tensors, str(tmp / "optimizer.safetensors"))
    save_file(masks, str(tmp / "masks.safetensors"))
    save_file({k: v.contiguous() for k, v in scores.items()}, str(tmp / "scores.safetensors"))
    save_file(rng.tensors, str(tmp / "rng.safetensors"))
    meta = {"step": state.step, "samples_seen": state.samples_seen,
            "model_fingerprint": state.model_fingerprint, "config": state.config,
            "optimizer": optimizer_meta, "scheduler": scheduler, "rng": rng.meta,
            "sha256": {name: _sha256(tmp / name) for name in TENSOR_FILES}}
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    old = run_dir / f".{CHECKPOINT_DIR}.old"
    if final.exists():  # else a kill came between the renames below and old is the only whole copy
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


@dataclass
class LoadedCheckpoint:
    """A checkpoint read back from disk."""

    state: RunState
    adapter: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    masks: dict[str, torch.Tensor]
    scores: dict[str, torch.Tensor]
    rng_tensors: dict[str, torch.Tensor]
    rng_meta: dict

    def restore_rng(self) -> None:
        """Put torch, numpy and Python RNGs back where they were when the checkpoint was taken."""
        _restore_rng(self.rng_tensors, self.rng_meta)


def load_checkpoint(run_dir: Path) -> LoadedCheckpoint:
    """Read ``run_dir/checkpoint`` to resume it; a missing or damaged one is a LoraPruneError."""
    folder = _checkpoint_folder(run_dir, "start without --resume, or point --resume at the run folder of an "
                                         "interrupted run")
    try:
        meta, read = _verified_reader(folder)
        return LoadedCheckpoint(
            state=_run_state(meta),
            adapter=read("adapter.safetensors"),
            optimizer=_optimizer_state(read("optimizer.safetensors"), meta["optimizer"]),
            scheduler=meta["scheduler"],
            masks=read("masks.safetensors"),
            scores=read("scores.safetensors"),
            rng_tensors=read("rng.safetensors"),
            rng_meta=meta["rng"],
        )
    except (DamagedFile, KeyError, TypeError, ValueError) as damaged:
        reason = damaged if isinstance(damaged, DamagedFile) else f"state.json: {type(damaged).__name__}"
        raise LoraPruneError(f"run checkpoint in {folder} is corrupted ({reason}); delete that folder and start "
                             "again without --resume") from None


@dataclass
class TrainedState:
    """What exporting a run needs of its checkpoint: the settings, the adapter and the masks."""

    state: RunState
    adapter: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]


def load_trained_state(run_dir: Path) -> TrainedState:
    """Read only what an export needs from ``run_dir/checkpoint`` (not the optimizer, scores or RNG)."""
    folder = _checkpoint_folder(run_dir, "RUN_DIR must be a finished --out folder (holding run/) or the "
                                         "OUT.partial folder of an interrupted run")
    try:
        meta, read = _verified_reader(folder)
        return TrainedState(_run_state(meta), read("adapter.safetensors"), read("masks.safetensors"))
    except DamagedFile as damaged:
        raise LoraPruneError(f"the run checkpoint in {folder} is damaged ({damaged}) and the export needs that "
                             "file; restore the run folder from a copy (a model already exported from it is "
                             "not affected)") from None


class DamagedFile(Exception):
    """A checkpoint file that cannot be read or whose checksum differs from the recorded one."""


def _checkpoint_folder(run_dir: Path, advice: str) -> Path:
    folder = run_dir / CHECKPOINT_DIR
    if not folder.exists():  # killed between save_checkpoint's two renames: the previous one is whole
        folder = run_dir / f".{CHECKPOINT_DIR}.old"
    if not (folder / "state.json").is_file():
        raise LoraPruneError(f"no run checkpoint in {run_dir}; {advice}")
    return folder


def _verified_reader(folder: Path) -> tuple[dict, Callable[[str], dict[str, torch.Tensor]]]:
    """state.json, and a function that reads one tensor file after checking it against state.json's sha256."""
    try:
        meta = json.loads((folder / "state.json").read_text())
    except (OSError, ValueError) as error:
        raise DamagedFile(f"state.json: {type(error).__name__}") from None
    checksums = meta.get("sha256", {}) if isinstance(meta, dict) else {}  # runs saved before checksums have none

    def read(name: str) -> dict[str, torch.Tensor]:
        path = folder / name
        try:
            if name in checksums and _sha256(path) != checksums[name]:
                raise DamagedFile(f"{name}: its sha256 differs from the one recorded in state.json")
            return load_file(str(path))
        except (OSError, ValueError, SafetensorError) as error:
            raise DamagedFile(f"{name}: {type(error).__name__}") from None

    return meta, read


def _run_state(meta: dict) -> RunState:
    try:
        return RunState(meta["step"], meta["samples_seen"], meta["model_fingerprint"], meta["config"])
    except (KeyError, TypeError) as error:
        raise DamagedFile(f"state.json: {type(error).__name__}") from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
