"""A GGUF export runs in llama.cpp and computes what the masked PyTorch model computed.

Tiny random Llamas carry SmolLM2's real tokenizer (a GGUF file needs one) and its vocabulary size;
llama.cpp runs through xllamacpp with a float32 KV cache and flash attention off.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, RepetitionPenaltyLogitsProcessor

from loraprune.errors import LoraPruneError
from loraprune.export import ExportRequest, export_model
from loraprune.export.gguf_header import read_gguf
from loraprune.export.gguf_writer import GGUF_NAME, rope_permuted
from loraprune.export.llamacpp import LlamaCpp
from loraprune.export.slicing import LayerWidths, slice_model, sliced_layer_widths
from loraprune.models import spec_for
from loraprune.pruning.masks import LayerMask, ModelMasks

pytest.importorskip("xllamacpp")

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. However little known the feelings or views of such a man may be "
        "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
        "surrounding families, that he is considered the rightful property of some one or other of their daughters.")
CONFIG = {"hidden_size": 96, "num_hidden_layers": 4, "num_attention_heads": 6, "num_key_value_heads": 3,
          "head_dim": 16, "intermediate_size": 96, "vocab_size": 49152, "max_position_embeddings": 512,
          "tie_word_embeddings": True, "rms_norm_eps": 1e-5, "initializer_range": 0.1,
          "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}
# Per layer: kept query heads (two per KV group of three KV groups) and kept FFN channels of 96.
PER_LAYER = [([0, 1, 2, 3, 4, 5], 96), ([0, 1, 4, 5], 40), ([2, 3], 70), ([0, 2, 4], 33)]
# The same with widths Q8_0's 32-wide blocks hold (o_proj rows: heads x 16; down_proj rows: FFN channels).
PER_LAYER_32 = [([0, 1, 2, 3, 4, 5], 96), ([0, 1, 4, 5], 64), ([2, 3], 32), ([0, 1, 2, 3], 64)]
UNIFORM = [([0, 1, 4, 5], 64), ([2, 3, 4, 5], 64), ([0, 1, 2, 3], 64), ([0, 1, 4, 5], 64)]
GREEDY_PROMPT, GREEDY_NEW = 12, 12


def tiny_llama(tie: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(**{**CONFIG, "tie_word_embeddings": tie})
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def masks_keeping(layers: list[tuple[list[int], int]], num_heads: int = 6, ffn: int = 96) -> ModelMasks:
    generator = torch.Generator().manual_seed(0)
    masks = []
    for heads, channels in layers:
        head_mask = torch.zeros(num_heads, dtype=torch.bool)
        head_mask[heads] = True
        ffn_mask = torch.zeros(ffn, dtype=torch.bool)
        ffn_mask[torch.randperm(ffn, generator=generator)[:channels]] = True
        masks.append(LayerMask(head_mask, ffn_mask))
    return ModelMasks(masks)


def torch_greedy(model, masks: ModelMasks, prompt: list[int], new_tokens: int,
                 repetition_penalty: float = 1.0) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens of the masked PyTorch model and the logits (float64) at each chosen step."""
    masks.attach(model, spec_for(model.config))
    ids, rows = list(prompt), []
    penalise = RepetitionPenaltyLogitsProcessor(repetition_penalty)
    with torch.inference_mode():
        for _ in range(new_tokens):
            row = model(input_ids=torch.tensor([ids])).logits[0, -1:].double()
            row = penalise(torch.tensor([ids]), row)[0] if repetition_penalty != 1.0 else row[0]
            rows.append(row)
            ids.append(int(row.argmax()))
    masks.detach()
    return ids[len(prompt):], torch.stack(rows)


def llamacpp_normalised(logits: torch.Tensor) -> torch.Tensor:
    """Log-softmax as llama.cpp's server reports it: a float32 running sum over the sorted vocabulary."""
    ordered = logits.float().sort(dim=-1, descending=True).values
    total = torch.exp(ordered - ordered[:, :1]).cumsum(dim=-1)[:, -1:]
    return (logits.float() - ordered[:, :1] - torch.log(total)).double()


def export(model, tokenizer, masks, out: Path, **kwargs) -> Path:
    probe = torch.tensor([tokenizer(TEXT)["input_ids"]])
    return export_model(ExportRequest(model, masks, tokenizer, {"model": "tiny"}, out, format="gguf", probe=probe,
                                      threads=1, **kwargs))


@pytest.mark.parametrize("layers, architecture", [(PER_LAYER, "deci"), (UNIFORM, "llama")])
def test_gguf_gives_the_masked_models_greedy_tokens_and_logprobs_in_llamacpp(
        layers, architecture, smollm2_tokenizer, tmp_path):
    model, masks = tiny_llama(), masks_keeping(layers)
    prompt = smollm2_tokenizer(TEXT)["input_ids"][:GREEDY_PROMPT]
    expected_tokens, expected_logits = torch_greedy(model, masks, prompt, GREEDY_NEW)

    out = export(copy.deepcopy(model), smollm2_tokenizer, masks, tmp_path / "pruned")

    runtime = LlamaCpp(out / GGUF_NAME, context=256, threads=1)
    try:
        greedy = runtime.greedy(prompt, GREEDY_NEW, candidates=5)
        llamacpp_ids = runtime.tokenize(TEXT)
    finally:
        runtime.close()
    assert llamacpp_ids == smollm2_tokenizer(TEXT)["input_ids"]  # the vocabulary was carried over
    assert greedy.tokens == expected_tokens
    assert len(set(expected_tokens)) > 3  # a continuation, not one token repeated
    expected_logprobs = torch.log_softmax(expected_logits, dim=-1)
    as_llamacpp_reports = llamacpp_normalised(expected_logits)
    for step, top in enumerate(greedy.top):
        assert [token for token, _ in top] == expected_logprobs[step].topk(5).indices.tolist()
        for token, logprob in top:
            assert logprob == pytest.approx(float(as_llamacpp_reports[step, token]), abs=1e-4)
            # Relative to the step's best candidate the float32 normaliser cancels: exact logit gaps.
            gap = float(expected_logprobs[step, token] - expected_logprobs[step, top[0][0]])
            assert logprob - top[0][1] == pytest.approx(gap, abs=1e-4)

    reader = read_gguf(out / GGUF_NAME)
    assert reader.fields["general.architecture"].contents() == architecture
    heads = reader.fields[f"{architecture}.attention.head_count"].contents()
    kept = [LayerWidths(len(h), len({i // 2 for i in h}), f) for h, f in layers]
    assert heads == ([w.heads for w in kept] if architecture == "deci" else kept[0].heads)
    assert reader.fields[f"{architecture}.attention.key_length"].contents() == 16
    assert reader.fields[f"{architecture}.rope.dimension_count"].contents() == 16
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied: llama.cpp reuses token_embd
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"  # the tokenizer's plain ByteLevel
    assert reader.fields["tokenizer.ggml.bos_token_id"].contents() == smollm2_tokenizer.bos_token_id
    assert "<|im_start|>" in reader.fields["tokenizer.chat_template"].contents()
    assert "general.sampling.penalty_repeat" not in reader.fields  # the run chose no decoding default
    check = json.loads((out / "loraprune.json").read_text())["export"]["logit_check"]
    assert check["passed"] and check["llamacpp"]["top1_agreement"] == 1.0
    assert check["llamacpp"]["relative_difference"] < 1e-5
    assert [p.name for p in tmp_path.iterdir()] == ["pruned"]


def test_untied_lora_model_in_f32_f16_and_q8_0_passes_its_check_and_shrinks_the_file(smollm2_tokenizer, tmp_path):
    sizes = {}
    for gguf_type in ("f32", "f16", "q8_0"):
        lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        model = get_peft_model(tiny_llama(tie=False), lora).eval()  # merging changes the weights
        layers = PER_LAYER_32 if gguf_type == "q8_0" else PER_LAYER
        out = export(model, smollm2_tokenizer, masks_keeping(layers), tmp_path / gguf_type, gguf_type=gguf_type)
        check = json.loads((out / "loraprune.json").read_text())["export"]["logit_check"]
        # Within 10x of what storing the weights in that type changes in PyTorch (a layout bug is ~1).
        assert check["passed"] and check["llamacpp"]["relative_difference"] < 0.1
        assert check["merge"]["relative_difference"] < 1e-5  # adapters merged, not dropped
        if gguf_type == "f32":
            assert check["llamacpp"]["relative_difference"] < 1e-5 and check["llamacpp"]["top1_agreement"] == 1.0
        else:
            assert check["weight_type_floor"] > 1e-4
        sizes[gguf_type] = (out / GGUF_NAME).stat().st_size
    assert sizes["q8_0"] < sizes["f16"] < sizes["f32"] / 1.9
    tensors = {t.name: t.tensor_type.name for t in read_gguf(out / GGUF_NAME).tensors}
    assert {kind for name, kind in tensors.items() if "norm" not in name} == {"Q8_0"}  # no silent F16 fallback
    assert tensors["blk.0.attn_norm.weight"] == "F32"


def test_widths_q8_0_blocks_cannot_hold_are_refused_before_anything_is_written(smollm2_tokenizer, tmp_path):
    with pytest.raises(LoraPruneError, match=r"layer 1's FFN width .* is 40, no multiple of 32.*--round-to 32"):
        export(tiny_llama(), smollm2_tokenizer, masks_keeping(PER_LAYER), tmp_path / "pruned", gguf_type="q8_0")
    assert list(tmp_path.iterdir()) == []


def test_source_gguf_tokenizer_keys_are_copied(smollm2_tokenizer, tmp_path):
    from loraprune.models.loading import builtin_gguf_path

    out = export(tiny_llama(), smollm2_tokenizer, masks_keeping(UNIFORM), tmp_path / "pruned",
                 source_gguf=builtin_gguf_path())
    source, written = read_gguf(builtin_gguf_path()), read_gguf(out / GGUF_NAME)
    keys = [k for k in source.fields if k.startswith("tokenizer.")]
    assert "tokenizer.ggml.merges" in keys and written.fields["tokenizer.ggml.pre"].contents() == "smollm"
    for key in keys:
        assert written.fields[key].contents() == source.fields[key].contents(), key


def test_the_runs_repetition_penalty_is_the_files_llamacpp_sampling_default(smollm2_tokenizer, tmp_path):
    model, masks, penalty = tiny_llama(), masks_keeping(UNIFORM), 2.0  # strong: it must change a tiny model's text
    prompt = smollm2_tokenizer(TEXT)["input_ids"][:GREEDY_PROMPT]
    penalised = torch_greedy(model, masks, prompt, GREEDY_NEW, repetition_penalty=penalty)[0]
    assert penalised != torch_greedy(model, masks, prompt, GREEDY_NEW)[0]
    out = export(model, smollm2_tokenizer, masks, tmp_path / "pruned", repetition_penalty=penalty)
    assert read_gguf(out / GGUF_NAME).fields["general.sampling.penalty_repeat"].contents() == penalty

    runtime = LlamaCpp(out / GGUF_NAME, context=256, threads=1)
    try:  # a request that sets no penalty gets the file's, as transformers applies it to the same tokens
        assert runtime.greedy(prompt, GREEDY_NEW, repeat_penalty=None).tokens == penalised
    finally:
        runtime.close()


def test_rope_permutation_matches_llamacpp_converter_layout():
    # Head of 4 rows (2 pairs): HF rotates halves (0, 1 | 2, 3); llama.cpp wants pairs (0, 2), (1, 3).
    weight = torch.arange(8.0).reshape(8, 1).numpy()
    assert rope_permuted(weight, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_per_layer_slicing_runs_in_pytorch_with_each_layers_widths():
    model, masks = tiny_llama(), masks_keeping(PER_LAYER)
    ids = torch.randint(0, 49152, (2, 9), generator=torch.Generator().manual_seed(0))
    masks.attach(model, spec_for(model.config))
    with torch.inference_mode():
        expected = model(input_ids=ids).logits
    masks.detach()
    sliced = slice_model(model, masks, spec_for(model.config), per_layer=True)
    assert sliced_layer_widths(sliced, spec_for(model.config)) == [(6, 3, 96), (4, 2, 40), (2, 1, 70), (3, 3, 33)]
    assert [layer.self_attn.num_key_value_groups for layer in sliced.model.layers] == [2, 2, 2, 1]
    with torch.inference_mode():
        assert torch.allclose(sliced(input_ids=ids).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layers, message", [
    ([([0, 1], 0)] + UNIFORM[1:], "layer 0 keeps no attention heads or no FFN channels"),
    ([([], 64)] + UNIFORM[1:], "layer 0 keeps no attention heads or no FFN channels"),
    (UNIFORM[:2] + [([0, 1, 2], 64)] + UNIFORM[3:], r"layer 2: .*\(\[1, 2\]\).*same count per KV group"),
])
def test_layers_no_runtime_can_run_are_refused_before_anything_is_written(layers, message, smollm2_tokenizer,
                                                                          tmp_path):
    with pytest.raises(LoraPruneError, match=message):
        export(tiny_llama(), smollm2_tokenizer, masks_keeping(layers), tmp_path / "pruned")
    assert list(tmp_path.iterdir()) == []


def test_unsupported_type_and_existing_output_are_refused(smollm2_tokenizer, tmp_path):
    with pytest.raises(LoraPruneError, match="--gguf-type must be one of f32, f16, q8_0, q6_k"):
        export(tiny_llama(), smollm2_tokenizer, masks_keeping(UNIFORM), tmp_path / "pruned", gguf_type="q4_k")
    out = tmp_path / "pruned"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(LoraPruneError, match="pass --overwrite"):
        export(tiny_llama(), smollm2_tokenizer, masks_keeping(UNIFORM), out)
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["pruned"]


def test_prune_refuses_gguf_for_a_word_level_tokenizer_before_training(tiny_run_inputs, tmp_path):
    from loraprune.config import PruneConfig
    from loraprune.job import prune

    model_dir, text = tiny_run_inputs
    out = tmp_path / "out"
    with pytest.raises(LoraPruneError, match="byte-level BPE.*--format transformers"):
        prune(PruneConfig(model=str(model_dir), data=f"text:{text}", sparsity=0.3, steps=12), out,
              progress=False, export_format="gguf")
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_prune_with_global_allocation_and_export_write_gguf_with_per_layer_widths(smollm2_tokenizer, tmp_path):
    from loraprune.config import PruneConfig
    from loraprune.job import export_run, prune

    model_dir = tmp_path / "tiny-smollm2"
    tiny_llama().save_pretrained(model_dir)
    smollm2_tokenizer.save_pretrained(model_dir)
    text = tmp_path / "austen.txt"
    text.write_text((TEXT + "\n") * 100)
    out = tmp_path / "out"
    # The embeddings are most of this tiny model: 2 % of it is what its layers can give.
    config = PruneConfig(model=str(model_dir), data=f"text:{text}", sparsity=0.02, skip_first_layers=1,
                         allocation="global", steps=6, prune_every=2, seq_len=32, eval_seq_len=32, eval_tokens=256,
                         save_every=6, lr=1e-3)
    prune(config, out, progress=False, export_format="gguf")

    assert sorted(p.name for p in out.iterdir()) == ["loraprune.json", GGUF_NAME, "run"]
    report = json.loads((out / "loraprune.json").read_text())
    assert report["export"]["architecture"] == "deci" and report["export"]["logit_check"]["passed"]
    widths = [(layer["heads"], layer["kv_heads"], layer["ffn"]) for layer in report["export"]["layers"]]
    assert widths[0] == (6, 3, 96) and any(w != widths[0] for w in widths[1:])  # skipped layer whole, others not
    export_run(out, tmp_path / "again", export_format="gguf", gguf_type="f16")
    assert json.loads((tmp_path / "again" / "loraprune.json").read_text())["export"]["gguf_type"] == "f16"
    from loraprune.info import checkpoint_info, format_info
    from loraprune.models.loading import load_model

    info = checkpoint_info(out)  # the folder holding model.gguf, read from the GGUF header
    assert info["architecture"] == "deci" and info["parameters"] == report["export"]["parameters_after"]
    assert [(w["heads"], w["kv_heads"], w["intermediate_size"]) for w in info["layers"]] == widths
    assert "deci" in format_info(info)
    with pytest.raises(LoraPruneError, match="llama.cpp") as refused:  # transformers cannot read 'deci'
        load_model(str(out / GGUF_NAME))
    assert len(str(refused.value)) < 300 and "\n" not in str(refused.value)
    export_run(out, tmp_path / "hf", export_format="transformers")  # per-layer widths: a DeciLM folder
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["DeciLMForCausalLM"]


def test_cli_passes_format_and_gguf_type_to_prune_and_export():
    from loraprune.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["export", "RUN", "--out", "OUT", "--format", "gguf", "--gguf-type", "q8_0"])
    assert (args.export_format, args.gguf_type) == ("gguf", "q8_0")
    args = parser.parse_args(["prune", "--out", "OUT"])  # None: the run's recorded format, else the defaults
    assert (args.export_format, args.gguf_type) == (None, None)
    with pytest.raises(SystemExit) as refused:
        parser.parse_args(["prune", "--out", "OUT", "--format", "gguf", "--gguf-type", "q4_k"])
    assert refused.value.code == 2
