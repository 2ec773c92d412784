"""Load a written Nemotron-NAS (DeciLM) folder with the modeling code it ships, strictly.

The folder's own ``modeling_decilm.py`` (this package's copy, byte for byte) runs it, so the export
check is the same forward pass a transformers user gets with ``trust_remote_code=True``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from loraprune.errors import LoraPruneError
from loraprune.export import configuration_decilm, modeling_decilm
from loraprune.export.modeling_decilm import DeciLMForCausalLM

WEIGHTS_NAME = "model.safetensors"
CONFIG_CODE_NAME = "configuration_decilm.py"
MODELING_CODE_NAME = "modeling_decilm.py"


def shipped_code() -> dict[str, str]:
    """File name → source of the config and modeling code a written folder ships for ``trust_remote_code``."""
    return {CONFIG_CODE_NAME: Path(configuration_decilm.__file__).read_text(),
            MODELING_CODE_NAME: Path(modeling_decilm.__file__).read_text()}


def auto_map() -> dict[str, str]:
    """config.json's auto_map: which shipped class transformers' Auto classes load."""
    return {"AutoConfig": f"{CONFIG_CODE_NAME.removesuffix('.py')}.DeciLMConfig",
            "AutoModelForCausalLM": f"{MODELING_CODE_NAME.removesuffix('.py')}.DeciLMForCausalLM"}


def load_decilm(folder: Path, dtype: torch.dtype | None = None) -> DeciLMForCausalLM:
    """The folder's model in eval mode; every stored tensor must match its block configs, none missing."""
    try:
        model, info = DeciLMForCausalLM.from_pretrained(Path(folder), dtype=dtype, output_loading_info=True)
    except (ValueError, RuntimeError, OSError) as e:
        raise LoraPruneError(f"{folder} does not load with its DeciLM code: its tensors do not match its "
                             f"block_configs or are missing ({str(e).splitlines()[0]}); re-export it") from e
    wrong = {kind: names for kind, names in info.items() if names and kind != "error_msgs"}
    if wrong or info.get("error_msgs"):
        raise LoraPruneError(f"the folder's tensors do not match its block_configs ({wrong or info['error_msgs']}); "
                             "re-export it")
    return model.eval()
