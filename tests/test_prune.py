"""The whole prune-while-fine-tuning run on tiny models: target met, deterministic, exported."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from loraprune import prune
from loraprune.config import PruneConfig
from loraprune.errors import LoraPruneError
from loraprune.evaluation.samples import SAMPLE_PROMPTS


def _config(model_dir, text, **overrides) -> PruneConfig:
    settings = {"model": str(model_dir), "data": f"text:{text}", "sparsity": 0.3, "steps": 12, "prune_every": 2,
                "seq_len": 32, "eval_seq_len": 32, "eval_tokens": 640, "save_every": 5, "lr": 1e-3,
                "allocation": "uniform"}  # one plain Llama config; the global default: test_nemotron_nas_writer
    return PruneConfig(**{**settings, **overrides})


def test_prune_meets_the_target_and_exports_a_loadable_smaller_model(tiny_run_inputs, tmp_path):
    model_dir, text = tiny_run_inputs
    result = prune(_config(model_dir, text), tmp_path / "out", progress=False)
    assert result.achieved_sparsity == pytest.approx(result.target.achieved_sparsity)
    assert abs(result.achieved_sparsity - 0.3) < 0.02
    report = json.loads((tmp_path / "out" / "loraprune.json").read_text())
    assert report["achieved_sparsity"] == result.achieved_sparsity
    assert report["perplexity_after"]["seq_len"] == 32
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    dense = AutoModelForCausalLM.from_pretrained(model_dir)
    assert loaded.num_parameters() < dense.num_parameters()
    assert not (tmp_path / "out.partial").exists()
    assert (tmp_path / "out" / "run" / "checkpoint" / "masks.safetensors").is_file()
    log = [json.loads(line) for line in (tmp_path / "out" / "run" / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == list(range(1, 13))
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in log)


@pytest.mark.parametrize("criterion", ["lora", "fisher", "grad", "magnitude", "random"])
def test_same_seed_gives_the_same_masks(tiny_run_inputs, tmp_path, criterion):
    model_dir, text = tiny_run_inputs
    kept = []
    for name in ("a", "b"):
        result = prune(_config(model_dir, text, criterion=criterion), tmp_path / name, progress=False)
        kept.append(result.report["kept_per_layer"])
        masks = (tmp_path / name / "run" / "checkpoint" / "masks.safetensors").read_bytes()
        kept.append(masks)
    assert kept[0] == kept[2] and kept[1] == kept[3]


def test_layer_exclusions_leave_those_layers_whole(tiny_run_inputs, tmp_path):
    model_dir, text = tiny_run_inputs
    result = prune(_config(model_dir, text, skip_first_layers=1, skip_last_layers=1, sparsity=0.2),
                   tmp_path / "out", export=False, progress=False)
    kept = result.report["kept_per_layer"]
    assert kept[0] == {"heads": 4, "ffn": 128} and kept[3] == {"heads": 4, "ffn": 128}
    assert kept[1] == kept[2] and kept[1] != kept[0]


def test_layer_exclusions_are_exported_as_a_deci_lm_folder_with_the_skipped_layer_whole(tiny_run_inputs, tmp_path):
    model_dir, text = tiny_run_inputs
    prune(_config(model_dir, text, skip_first_layers=1), tmp_path / "out", progress=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["DeciLMForCausalLM"]
    assert config["block_configs"][0]["ffn"]["intermediate_size"] == 128
    assert config["block_configs"][1]["ffn"]["intermediate_size"] < 128


def test_self_distillation_run_exports_and_records_its_setting(tiny_run_inputs, tmp_path):
    model_dir, text = tiny_run_inputs
    result = prune(_config(model_dir, text, criterion="fisher", distill=0.5, distill_temperature=2.0),
                   tmp_path / "out", progress=False)
    report = json.loads((tmp_path / "out" / "loraprune.json").read_text())
    assert report["config"]["distill"] == 0.5 and report["config"]["distill_temperature"] == 2.0
    assert abs(result.achieved_sparsity - 0.3) < 0.02
    log = [json.loads(line) for line in (tmp_path / "out" / "run" / "log.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in log)


def test_report_holds_greedy_samples_and_out_of_domain_measures_before_and_after(tiny_run_inputs, tmp_path):
    model_dir, text = tiny_run_inputs
    # The paper's late ramp end leaves this tiny model's top-1 tokens visibly changed (half time: all recovered).
    result = prune(_config(model_dir, text, cooldown_fraction=0.1), tmp_path / "out", progress=False)
    report = json.loads((tmp_path / "out" / "loraprune.json").read_text())
    ood = report["out_of_domain"]
    assert ood == result.out_of_domain
    assert ood["before"]["perplexity"]["data"] == ood["after"]["perplexity"]["data"] == "pydoc"  # text: → pydoc
    assert ood["after"]["perplexity"]["n_tokens"] == ood["before"]["perplexity"]["n_tokens"] > 0
    assert ood["after"]["fidelity"]["kl"] > 0 and 0 <= ood["after"]["fidelity"]["top1_agreement"] < 1
    for health in (ood["before"]["generation"], ood["after"]["generation"]):
        assert health["n_prompts"] == len(health["samples"]) >= 20
        assert 0 <= health["repetition"] <= 1
    samples = report["greedy_samples"]
    assert [s["prompt"] for s in samples] == list(SAMPLE_PROMPTS)
    assert all(isinstance(s["before"], str) and isinstance(s["after"], str) for s in samples)
    assert any(s["before"] != s["after"] for s in samples)  # pruning 30 % of a tiny model changes its text
    decoding = report["decoding"]  # the repetition penalty, chosen against the dense model on the tuning prompts
    assert decoding["measured"] and decoding["n_prompts"] > 0 and decoding["dense_repetition"] is not None
    assert float(list(decoding["tried"])[-1]) == decoding["repetition_penalty"]
    shipped = json.loads((tmp_path / "out" / "generation_config.json").read_text())["repetition_penalty"]
    assert shipped == decoding["repetition_penalty"]
    if shipped != 1.0:
        assert decoding["generation"]["repetition_penalty"] == shipped and "after_with_penalty" in samples[0]


def test_a_given_repetition_penalty_is_shipped_unmeasured_and_judged_on_the_health_prompts(tiny_run_inputs, tmp_path):
    model_dir, text = tiny_run_inputs
    result = prune(_config(model_dir, text, steps=4, repetition_penalty=1.2), tmp_path / "out", progress=False)
    decoding = result.report["decoding"]
    assert (decoding["repetition_penalty"], decoding["measured"], decoding["tried"]) == (1.2, False, {})
    assert decoding["generation"]["repetition_penalty"] == 1.2 and decoding["generation"]["n_prompts"] >= 20
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text())["repetition_penalty"] == 1.2


def test_a_failed_logit_check_keeps_the_run_and_export_can_write_it_anyway(tiny_run_inputs, tmp_path, monkeypatch,
                                                                            capsys):
    from loraprune.cli import main
    from loraprune.export import transformers_writer

    real_slice = transformers_writer.slice_model

    def slicing_with_a_bug(model, masks, spec):  # two kept FFN channels trade their down_proj columns
        sliced = real_slice(model, masks, spec)
        with torch.no_grad():
            down = sliced.model.layers[1].mlp.down_proj.weight
            down[:, [0, 1]] = down[:, [1, 0]].clone()
        return sliced

    monkeypatch.setattr(transformers_writer, "slice_model", slicing_with_a_bug)
    model_dir, text = tiny_run_inputs
    out, run_dir = tmp_path / "out", tmp_path / "out.partial"
    with pytest.raises(LoraPruneError, match=f"run is kept in {run_dir}.*--skip-logit-check"):
        prune(_config(model_dir, text), out, progress=False)
    assert not out.exists() and (run_dir / "checkpoint" / "state.json").is_file()

    assert main(["export", str(run_dir), "--out", str(out)]) == 2
    assert "beyond rounding" in capsys.readouterr().err and not out.exists()
    assert main(["export", str(run_dir), "--out", str(out), "--skip-logit-check"]) == 0
    check = json.loads((out / "loraprune.json").read_text())["export"]["logit_check"]
    assert check["passed"] is False and check["probe_tokens"] == 128
    assert AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).num_parameters() > 0


def test_export_command_writes_a_saved_run(tiny_run_inputs, tmp_path):
    from loraprune.cli import main

    model_dir, text = tiny_run_inputs
    prune(_config(model_dir, text), tmp_path / "out", export=False, progress=False)
    assert main(["export", str(tmp_path / "out.partial"), "--out", str(tmp_path / "again")]) == 0
    report = json.loads((tmp_path / "again" / "loraprune.json").read_text())
    assert report["export"]["logit_check"]["passed"] and report["steps"] == 12
    assert report["kept_per_layer"] and report["perplexity_after"]["seq_len"] == 32  # from the run's report.json


def test_a_re_export_keeps_what_the_prune_reported_about_its_run(tiny_run_inputs, tmp_path):
    from loraprune.cli import main

    model_dir, text = tiny_run_inputs
    prune(_config(model_dir, text, steps=4), tmp_path / "out", progress=False)
    assert main(["export", str(tmp_path / "out"), "--out", str(tmp_path / "again")]) == 0
    pruned = json.loads((tmp_path / "out" / "loraprune.json").read_text())
    again = json.loads((tmp_path / "again" / "loraprune.json").read_text())
    measured = ["achieved_sparsity", "kept_per_layer", "perplexity_before", "perplexity_after", "out_of_domain",
                "greedy_samples", "decoding", "processes", "config", "steps"]
    assert {key: again.get(key) for key in measured} == {key: pruned[key] for key in measured}
    assert again["finished"] and again["export"]["logit_check"]["passed"]
    assert again["export"]["layers"] == pruned["export"]["layers"]
    shipped = [json.loads((tmp_path / folder / "generation_config.json").read_text())["repetition_penalty"]
               for folder in ("out", "again")]
    assert shipped == [pruned["decoding"]["repetition_penalty"]] * 2


def test_export_refuses_an_out_that_would_overwrite_its_own_run(tiny_run_inputs, tmp_path):
    from loraprune.cli import main

    model_dir, text = tiny_run_inputs
    prune(_config(model_dir, text, steps=2), tmp_path / "out", progress=False)
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "out").rglob("*"))
    for out in (tmp_path / "out", tmp_path / "out" / "run", tmp_path / "out" / "run" / "again"):
        assert main(["export", str(tmp_path / "out"), "--out", str(out), "--overwrite"]) == 2
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "out").rglob("*")) == before


def test_per_layer_refusal_names_only_the_flags_that_asked_for_per_layer_widths(tmp_path):
    from loraprune.config import PruneConfig
    from loraprune.errors import LoraPruneError
    from loraprune.job import prune
    from tests.conftest import build_tiny_model, build_word_tokenizer

    model_dir, text = tmp_path / "tiny-qwen2", tmp_path / "corpus.txt"  # biases: no DeciLM folder
    build_tiny_model("qwen2").save_pretrained(model_dir)
    build_word_tokenizer([f"w{i}" for i in range(100)]).save_pretrained(model_dir)
    text.write_text(" ".join(f"w{i % 30}" for i in range(4000)))
    config = PruneConfig(model=str(model_dir), data=f"text:{text}", sparsity=0.2, steps=12, skip_first_layers=1,
                         allocation="uniform", seq_len=32)
    with pytest.raises(LoraPruneError, match=r"from --skip-first 1\)") as refused:
        prune(config, tmp_path / "out", progress=False)
    assert "--allocation global" not in str(refused.value) and "use the transformers format" not in str(refused.value)
    assert "; drop --skip-first 1 for a plain folder" in str(refused.value)


def test_auto_allocation_is_global_for_every_export_format_and_uniform_without_export():
    from loraprune.config import PruneConfig
    from loraprune.job import resolved_allocation

    auto = PruneConfig()
    assert auto.allocation == "auto"
    for export_format in ("gguf", "nemotron-nas", "transformers"):
        assert resolved_allocation(auto.with_overrides({"export_format": export_format})).allocation == "global"
    assert resolved_allocation(auto.with_overrides({"export": False})).allocation == "uniform"
    assert resolved_allocation(PruneConfig(allocation="uniform", export_format="gguf")).allocation == "uniform"
    capped = auto.with_overrides({"export": False, "max_layer_sparsity": 0.5})  # a cap asks for global allocation
    assert resolved_allocation(capped).allocation == "global"


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_kl_only_run_with_bias_compensation_exports_the_biases_and_resumes_them(tiny_run_inputs, tmp_path,
                                                                                allocation):
    """The whole pipeline: KL-only training, means in the checkpoint, biases in the exported folder."""
    from safetensors.torch import load_file

    model_dir, text = tiny_run_inputs
    result = prune(_config(model_dir, text, criterion="fisher", distill=1.0, distill_top_k=20,
                           bias_compensation=True, allocation=allocation), tmp_path / "out", progress=False)
    assert abs(result.achieved_sparsity - 0.3) < 0.02
    masks = load_file(tmp_path / "out" / "run" / "checkpoint" / "masks.safetensors")
    assert masks["layers.0.ffn_counts"].max() > 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["attention_bias"] and config["mlp_bias"]
    report = json.loads((tmp_path / "out" / "loraprune.json").read_text())
    assert report["export"]["logit_check"]["passed"]
