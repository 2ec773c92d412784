"""Checkpoints: a round trip gives back every tensor and RNG state; damage or absence is a clear error."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from loraprune.errors import LoraPruneError
from loraprune.pruning.groups import LayerShape
from loraprune.pruning.masks import ModelMasks
from loraprune.pruning.scores import LayerScores, MovingAverageScores
from loraprune.training.checkpoint import (
    RunState,
    capture_rng,
    load_checkpoint,
    load_trained_state,
    model_fingerprint,
    save_checkpoint,
)

SHAPE = LayerShape(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128)


def trained_linear() -> tuple[nn.Linear, torch.optim.AdamW, torch.optim.lr_scheduler.LinearLR]:
    """A small nn.Linear after two real AdamW steps, with its optimizer and scheduler."""
    torch.manual_seed(0)
    layer = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.5, total_iters=4)
    for _ in range(2):
        layer(torch.randn(5, 3)).pow(2).sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return layer, optimizer, scheduler


def save_example(run_dir, step: int = 7, **overrides):
    """Save a checkpoint of a trained linear layer, masks and scores; return what was saved."""
    layer, optimizer, scheduler = trained_linear()
    masks = ModelMasks.full(SHAPE, 2)
    masks.layers[1].heads[3] = False
    masks.layers[0].ffn[:5] = False
    scores = MovingAverageScores(0.9)
    scores.update({1: LayerScores(torch.tensor([0.25, 2.0]), torch.linspace(0, 1, 128))})
    saved = {"state": RunState(step, 4 * step, "abc123", {"sparsity": 0.3, "lora": {"rank": 8}}),
             "adapter": {"layers.0.lora_A": torch.randn(2, 3), "layers.0.lora_B": torch.zeros(4, 2)},
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "masks": masks.state_dict(), "scores": scores.state_dict(), "rng": capture_rng(), **overrides}
    save_checkpoint(run_dir, **saved)
    return saved, layer, optimizer


def test_round_trip_returns_equal_tensors_optimizer_state_scheduler_masks_and_scores(tmp_path):
    saved, _, _ = save_example(tmp_path)

    loaded = load_checkpoint(tmp_path)

    assert loaded.state == saved["state"]
    assert loaded.scheduler == saved["scheduler"] and loaded.scheduler["last_epoch"] == 2
    for name in ("adapter", "masks", "scores"):
        got, want = getattr(loaded, name), saved[name]
        assert sorted(got) == sorted(want), name
        assert all(torch.equal(got[key], want[key]) for key in want), name
    assert sorted(loaded.optimizer["state"]) == [0, 1]
    for index, per_param in saved["optimizer"]["state"].items():
        assert sorted(loaded.optimizer["state"][index]) == ["exp_avg", "exp_avg_sq", "step"]
        for key, value in per_param.items():
            assert torch.equal(loaded.optimizer["state"][index][key], value), (index, key)
    assert loaded.optimizer["state"][0]["step"].item() == 2


def test_loaded_optimizer_takes_the_same_third_step_as_the_original(tmp_path):
    _, layer, optimizer = save_example(tmp_path)
    fresh = nn.Linear(3, 2)
    fresh.load_state_dict(layer.state_dict())
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=0.1, weight_decay=0.01)
    fresh_optimizer.load_state_dict(load_checkpoint(tmp_path).optimizer)
    batch = torch.randn(5, 3)
    for model, opt in ((layer, optimizer), (fresh, fresh_optimizer)):
        model(batch).pow(2).sum().backward()
        opt.step()
    assert torch.equal(fresh.weight, layer.weight) and torch.equal(fresh.bias, layer.bias)


def test_restore_rng_replays_torch_numpy_and_python_draws(tmp_path):
    snapshot = capture_rng()
    expected = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    save_example(tmp_path, rng=snapshot)  # reseeds torch on the way
    np.random.rand(10), random.random()  # move the other generators on

    load_checkpoint(tmp_path).restore_rng()

    assert torch.equal(torch.rand(4), expected[0])
    assert np.array_equal(np.random.rand(4), expected[1])
    assert [random.random() for _ in range(4)] == expected[2]


def test_missing_checkpoint_is_an_error_naming_resume(tmp_path):
    with pytest.raises(LoraPruneError, match="no run checkpoint.*--resume"):
        load_checkpoint(tmp_path / "never-written")


def test_missing_checkpoint_for_export_names_what_run_dir_must_be_not_resume(tmp_path):
    with pytest.raises(LoraPruneError, match="RUN_DIR must be a finished --out folder") as refused:
        load_trained_state(tmp_path / "model.gguf")
    assert "--resume" not in str(refused.value)


def test_truncated_safetensors_file_is_an_error_naming_the_fix(tmp_path):
    save_example(tmp_path)
    adapter = tmp_path / "checkpoint" / "adapter.safetensors"
    adapter.write_bytes(adapter.read_bytes()[: adapter.stat().st_size // 2])
    with pytest.raises(LoraPruneError, match="corrupted.*without --resume"):
        load_checkpoint(tmp_path)


def _flip_last_bytes(path, count: int = 4) -> None:
    """Invert the last bytes of a file (tensor data in a safetensors file): same size, other values."""
    data = bytearray(path.read_bytes())
    data[-count:] = bytes(b ^ 0xFF for b in data[-count:])
    path.write_bytes(bytes(data))


def test_a_same_size_bit_flip_is_refused_by_resume_and_export_naming_the_file(tmp_path):
    save_example(tmp_path)
    adapter = tmp_path / "checkpoint" / "adapter.safetensors"
    size = adapter.stat().st_size
    _flip_last_bytes(adapter)
    assert adapter.stat().st_size == size
    with pytest.raises(LoraPruneError, match="corrupted.*adapter.safetensors: its sha256 differs"):
        load_checkpoint(tmp_path)
    with pytest.raises(LoraPruneError, match="damaged.*adapter.safetensors: its sha256 differs") as refused:
        load_trained_state(tmp_path)
    assert "--resume" not in str(refused.value) and "delete" not in str(refused.value)


def test_export_reads_only_the_adapter_masks_and_state(tmp_path):
    saved, _, _ = save_example(tmp_path)
    for name in ("optimizer", "scores", "rng"):
        _flip_last_bytes(tmp_path / "checkpoint" / f"{name}.safetensors")
    trained = load_trained_state(tmp_path)
    assert trained.state == saved["state"]
    assert all(torch.equal(trained.adapter[k], saved["adapter"][k]) for k in saved["adapter"])
    assert all(torch.equal(trained.masks[k], saved["masks"][k]) for k in saved["masks"])
    with pytest.raises(LoraPruneError, match="optimizer.safetensors"):
        load_checkpoint(tmp_path)


def test_kill_between_the_renames_leaves_the_old_checkpoint_readable(tmp_path):
    save_example(tmp_path, step=3)
    os.replace(tmp_path / "checkpoint", tmp_path / ".checkpoint.old")  # the first rename of the next save

    assert load_checkpoint(tmp_path).state.step == 3

    save_example(tmp_path, step=4)  # the next save completes and clears the old copy
    assert load_checkpoint(tmp_path).state.step == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_cuda_rng_states_are_saved_and_restored(tmp_path, monkeypatch):
    cuda_state = torch.arange(16, dtype=torch.uint8)
    restored = []
    with monkeypatch.context() as patch:  # a machine with one GPU, while the RNG is captured
        patch.setattr(torch.cuda, "is_available", lambda: True)
        patch.setattr(torch.cuda, "get_rng_state_all", lambda: [cuda_state.clone()])
        snapshot = capture_rng()
    assert torch.equal(snapshot.tensors["cuda.0"], cuda_state)
    save_example(tmp_path, rng=snapshot)
    loaded = load_checkpoint(tmp_path)
    with monkeypatch.context() as patch:  # ... and while it is restored
        patch.setattr(torch.cuda, "is_available", lambda: True)
        patch.setattr(torch.cuda, "device_count", lambda: 1)
        patch.setattr(torch.cuda, "set_rng_state_all", restored.append)
        loaded.restore_rng()

    assert len(restored) == 1 and len(restored[0]) == 1
    assert torch.equal(restored[0][0], cuda_state)


def test_model_fingerprint_changes_when_one_embedding_weight_changes(tiny_llama):
    before = model_fingerprint(tiny_llama)
    assert model_fingerprint(tiny_llama) == before and len(before) == 16
    with torch.no_grad():
        tiny_llama.get_input_embeddings().weight[17, 3] += 0.01
    assert model_fingerprint(tiny_llama) != before
