"""Fully sharded runs (FSDP2): each process keeps only its shard of every weight, frozen or LoRA.

Each decoder layer is one ``fully_shard`` unit (gathered for its forward and backward, then freed),
and the root holds the embeddings, final norm and head. Checkpoints and exports need whole tensors:
the helpers here gather them, and every process must call them together.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from loraprune.models import ArchSpec, decoder_layers


def shard_model(model: nn.Module, spec: ArchSpec, device: torch.device) -> nn.Module:
    """Shard ``model`` in place over all processes, one FSDP2 unit per decoder layer plus the root.

    Parameters still on the CPU are moved shard by shard to ``device``, so a model that does not
    fit one device never has to be there whole.
    """
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in decoder_layers(model, spec):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a shard (a collective: every process must call it); others pass through."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor of a state dict gathered whole (a collective, in the dict's order)."""
    return {name: full_tensor(tensor) for name, tensor in tensors.items()}


def full_optimizer_state(state: dict) -> dict:
    """An optimizer state dict with its sharded moments gathered whole, as an unsharded run saves it."""
    per_param = {index: full_state(values) for index, values in state["state"].items()}
    return {"state": per_param, "param_groups": state["param_groups"]}


def sharded_optimizer_state(state: dict, parameters: list[nn.Parameter]) -> dict:
    """A saved (whole) optimizer state dict cut into this process's shards of ``parameters``.

    ``parameters`` are in the optimizer's order, the one its saved indices count in.
    """
    per_param = {}
    for index, values in state["state"].items():
        parameter = parameters[int(index)]
        per_param[index] = {
            # Each process cuts its own shard from the same saved tensor: no communication.
            key: distribute_tensor(value.to(parameter.device), parameter.device_mesh, parameter.placements,
                                   src_data_rank=None)
            if isinstance(parameter, DTensor) and value.shape == parameter.shape else value
            for key, value in values.items()}
    return {"state": per_param, "param_groups": state["param_groups"]}


def frozen_weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of frozen weights this process holds, bytes of all frozen weights of the model)."""
    local, whole = 0, 0
    for name, parameter in model.named_parameters():
        if "lora_" in name:  # the adapters are trained; everything else is frozen
            continue
        held = parameter.to_local() if isinstance(parameter, DTensor) else parameter
        local += held.numel() * held.element_size()
        whole += parameter.numel() * parameter.element_size()
    return local, whole
