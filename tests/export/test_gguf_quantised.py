"""GGUF files quantised by llama.cpp's quantizer (q6_k, q5_k_m, q4_k_m, q4_0): every projection in the
requested type, the same greedy tokens as the f32 file, and widths a type cannot hold refused early."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from loraprune.config import GGUF_TYPE_NAMES, PruneConfig
from loraprune.errors import LoraPruneError
from loraprune.export import ExportRequest, export_model
from loraprune.export.gguf_header import read_gguf
from loraprune.export.gguf_types import GGUF_TYPES, check_reachable_widths_fit, check_widths_fit, projection_types
from loraprune.export.gguf_writer import GGUF_NAME
from loraprune.export.llamacpp import LlamaCpp
from loraprune.export.slicing import LayerWidths
from loraprune.job import prune, resolved_round_to
from loraprune.pruning.groups import LayerShape
from loraprune.pruning.masks import LayerMask, ModelMasks

pytest.importorskip("xllamacpp")

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife.")
# Rows K-quants hold: hidden 256; a KV group is 4 query heads x 64 = 256 columns of o_proj.
CONFIG = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
          "head_dim": 64, "intermediate_size": 768, "vocab_size": 49152, "max_position_embeddings": 512,
          "tie_word_embeddings": False, "rms_norm_eps": 1e-5, "initializer_range": 0.1,
          "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}
# Per layer: kept query heads (whole KV groups of four) and kept FFN channels of 768.
PER_LAYER = [(list(range(8)), 768), ([0, 1, 2, 3], 512), (list(range(8)), 256), ([4, 5, 6, 7], 768)]
QUANTISED = ["q6_k", "q5_k_m", "q4_k_m", "q4_0"]
GREEDY_PROMPT, GREEDY_NEW = 12, 8


def confident_model():
    """A random model with confident greedy choices: the output matrix maps token x to a fixed other token.

    On near-flat random logits over 49,152 tokens 4-bit rounding flips the argmax (Q4_K_M moves them by
    ~50 %); here the chosen token wins by ~3x while the layers (o_proj and down_proj scaled down) still
    move the logits. The export's own check compares the layers in llama.cpp with PyTorch.
    """
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**CONFIG), dtype=torch.float32).eval()
    with torch.no_grad():
        embedding = model.get_input_embeddings().weight
        model.get_output_embeddings().weight.copy_(embedding[torch.randperm(embedding.shape[0])])
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(0.005)
            layer.mlp.down_proj.weight.mul_(0.005)
    return model


def masks_keeping(layers) -> ModelMasks:
    generator = torch.Generator().manual_seed(0)
    masks = []
    for heads, channels in layers:
        head_mask = torch.zeros(8, dtype=torch.bool)
        head_mask[heads] = True
        ffn_mask = torch.zeros(768, dtype=torch.bool)
        ffn_mask[torch.randperm(768, generator=generator)[:channels]] = True
        masks.append(LayerMask(head_mask, ffn_mask))
    return ModelMasks(masks)


def export(tokenizer, out, layers=PER_LAYER, **kwargs):
    probe = torch.tensor([tokenizer(TEXT)["input_ids"]])
    model = confident_model()
    return export_model(ExportRequest(model, masks_keeping(layers), tokenizer, {"model": "tiny"}, out, format="gguf",
                                      probe=probe, threads=1, **kwargs))


def greedy_tokens(path, prompt: list[int]) -> list[int]:
    runtime = LlamaCpp(path, context=256, threads=1)
    try:
        return runtime.greedy(prompt, GREEDY_NEW).tokens
    finally:
        runtime.close()


def test_the_cli_offers_exactly_the_types_the_writer_has():
    assert GGUF_TYPE_NAMES == tuple(GGUF_TYPES)


@pytest.fixture(scope="module")
def f32_reference(smollm2_tokenizer, tmp_path_factory):
    """The same model and masks as an f32 file, and its greedy tokens: what every quantised file is held to."""
    pytest.importorskip("llama_cpp")  # the quantizer: without it there is nothing to compare
    reference = export(smollm2_tokenizer, tmp_path_factory.mktemp("f32") / "f32", gguf_type="f32")
    tokens = greedy_tokens(reference / GGUF_NAME, smollm2_tokenizer(TEXT)["input_ids"][:GREEDY_PROMPT])
    assert len(set(tokens)) > 3  # a continuation, not one token repeated
    return reference / GGUF_NAME, tokens


@pytest.mark.parametrize("gguf_type", QUANTISED)
def test_every_projection_has_the_requested_type_and_llamacpp_gives_the_f32_files_tokens(
        gguf_type, smollm2_tokenizer, f32_reference, tmp_path):
    pytest.importorskip("llama_cpp")
    reference, f32_tokens = f32_reference
    out = export(smollm2_tokenizer, tmp_path / gguf_type, gguf_type=gguf_type)

    reader = read_gguf(out / GGUF_NAME)
    types = projection_types(reader.tensors)
    assert len(types) == 7 * 4
    allowed = {t.name for t in GGUF_TYPES[gguf_type].projection_types}
    assert set(types.values()) <= allowed, types  # no silent fallback to Q8_0, Q5_0 or F16
    base = {"q6_k": "Q6_K", "q5_k_m": "Q5_K", "q4_k_m": "Q4_K", "q4_0": "Q4_0"}[gguf_type]
    assert sum(kind == base for kind in types.values()) > len(types) // 2
    assert sorted(p.name for p in out.iterdir()) == ["loraprune.json", GGUF_NAME]  # the f16 input is gone
    report = json.loads((out / "loraprune.json").read_text())["export"]
    assert report["gguf_type"] == gguf_type and report["logit_check"]["passed"]
    assert report["logit_check"]["weight_type_floor"] > 1e-3  # the floor saw the quantised weights
    assert report["file_bytes"] < reference.stat().st_size / 3.5
    assert int(reader.fields["general.file_type"].contents()) == int(GGUF_TYPES[gguf_type].file_type)

    assert greedy_tokens(out / GGUF_NAME, smollm2_tokenizer(TEXT)["input_ids"][:GREEDY_PROMPT]) == f32_tokens


def test_widths_the_type_cannot_hold_are_refused_before_anything_is_written(smollm2_tokenizer, tmp_path):
    layers = [(list(range(8)), 768), ([0, 1, 2, 3], 500), (list(range(8)), 256), ([4, 5, 6, 7], 768)]
    with pytest.raises(LoraPruneError, match=r"layer 1's FFN width .* is 500, no multiple of 256.*--round-to 256"):
        export(smollm2_tokenizer, tmp_path / "pruned", layers=layers, gguf_type="q4_k_m")
    with pytest.raises(LoraPruneError, match=r"layer 1's attention output \(2 heads x 64\) is 128"):
        export(smollm2_tokenizer, tmp_path / "pruned", layers=[PER_LAYER[0], ([0, 4], 512), *PER_LAYER[2:]],
               gguf_type="q6_k")
    assert list(tmp_path.iterdir()) == []


def test_round_to_defaults_to_what_the_gguf_type_needs():
    def round_to(export_format, gguf_type, config=None):
        settings = {"export": export_format is not None, "export_format": export_format or "transformers",
                    "gguf_type": gguf_type if export_format == "gguf" else None}
        return resolved_round_to((config or PruneConfig()).with_overrides(settings)).round_to

    assert [round_to("gguf", t) for t in ("f32", "f16", "q8_0", "q4_0", "q6_k", "q4_k_m")] == [1, 1, 32, 32, 256, 256]
    assert round_to("transformers", "q4_k_m") == round_to(None, "q4_k_m") == 1
    assert round_to("gguf", "q4_k_m", PruneConfig(round_to=512)) == 512


@pytest.mark.parametrize("gguf_type, options, message", [
    ("q4_k_m", {"round_to": 32}, r"--round-to 32 .* no multiple of 256.*pass --round-to 256"),
    ("q8_0", {"round_to": 8}, r"--round-to 8 .* no multiple of 32.*pass --round-to 32"),
])
def test_prune_refuses_a_type_the_widths_cannot_fit_before_training(gguf_type, options, message, smollm2_tokenizer,
                                                                    tmp_path):
    from tests.export.test_gguf_writer import tiny_llama

    model_dir = tmp_path / "tiny-smollm2"
    tiny_llama().save_pretrained(model_dir)  # hidden 96
    smollm2_tokenizer.save_pretrained(model_dir)
    text = tmp_path / "austen.txt"
    text.write_text((TEXT + "\n") * 100)
    out = tmp_path / "out"
    with pytest.raises(LoraPruneError, match=message):
        prune(PruneConfig(model=str(model_dir), data=f"text:{text}", sparsity=0.02, steps=6, **options), out,
              progress=False, export_format="gguf", gguf_type=gguf_type)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["austen.txt", "tiny-smollm2"]


def test_only_rows_the_models_own_layout_fixes_may_fall_back_and_the_note_names_them():
    smollm2 = LayerShape(576, 9, 3, 64, 1536)
    note = check_reachable_widths_fit("q4_k_m", smollm2, 256, "kv_group", None)
    assert "the hidden size (the rows of q/k/v/gate/up) is 576" in note and "q5_0/q5_1/q8_0" in note
    assert "the FFN width (the rows of down_proj" not in note  # 1536 = 6 x 256 holds K-quant blocks
    assert check_reachable_widths_fit("q8_0", smollm2, 32, "kv_group", None) is None
    check_widths_fit("q4_k_m", smollm2, [LayerWidths(6, 2, 768), LayerWidths(9, 3, 1536), LayerWidths(3, 1, 256)])
    with pytest.raises(LoraPruneError, match=r"layer 1's FFN width .* is 1000, no multiple of 256"):
        check_widths_fit("q4_k_m", smollm2, [LayerWidths(6, 2, 768), LayerWidths(9, 3, 1000)])
    with pytest.raises(LoraPruneError, match=r"--round-to 32 .*pass --round-to 256"):
        check_reachable_widths_fit("q4_k_m", smollm2, 32, "kv_group", None)
    odd = LayerShape(100, 4, 2, 25, 512)  # rows of 100 hold no block of 32 either: nothing to fall back to
    with pytest.raises(LoraPruneError, match=r"hidden size .* is 100, no multiple of 256"):
        check_reachable_widths_fit("q4_k_m", odd, 256, "kv_group", None)
    # A model whose own widths fit K-quants gets no fallback for widths pruning chose badly.
    llama = LayerShape(2048, 32, 8, 64, 8192)
    with pytest.raises(LoraPruneError, match=r"attention output \(2 heads x 64\) is 128"):
        check_widths_fit("q4_k_m", llama, [LayerWidths(2, 1, 8192)])
