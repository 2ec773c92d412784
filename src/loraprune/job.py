"""The whole job as users call it: folders, resume, evaluation before and after, export.

``prune`` is ``loraprune.prune`` and what ``loraprune prune`` calls; ``export_run`` re-exports a
saved run. The training itself is the recipe's (loraprune.training.recipe).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from loraprune.config import EXPORT_FORMATS, PruneConfig, calibration_sources
from loraprune.data.blocks import corpus_blocks, corpus_ids
from loraprune.data.corpora import load_corpus
from loraprune.data.generated import (
    CALIBRATION_FILE,
    SELF,
    SELF_FILE,
    VALIDATION_FRACTION,
    DataSpec,
    GeneratedText,
    generate_text,
    parse_data,
    scoring_block_count,
    scoring_text,
    self_block_count,
)
from loraprune.destination import check_creatable
from loraprune.errors import LoraPruneError
from loraprune.evaluation.decoding import choose_repetition_penalty, given_repetition_penalty, tuning_prompts
from loraprune.evaluation.fidelity import dense_view
from loraprune.evaluation.generation import generation_health
from loraprune.evaluation.harness import out_of_domain_blocks, out_of_domain_report
from loraprune.evaluation.perplexity import PerplexityResult, evaluate_perplexity, perplexity
from loraprune.evaluation.samples import SAMPLE_PROMPTS, greedy_samples
from loraprune.export import ExportRequest, export_model
from loraprune.export.gguf_types import check_gguf_type, check_reachable_widths_fit, default_round_to
from loraprune.export.gguf_vocab import check_vocab
from loraprune.export.gguf_writer import check_architecture, check_no_bias_compensation
from loraprune.export.logit_check import LogitCheckFailed
from loraprune.export.nemotron_nas_folder import check_exportable as check_nemotron_nas
from loraprune.models import spec_for
from loraprune.models.loading import load_model, source_gguf_file
from loraprune.pruning.groups import LayerShape
from loraprune.pruning.masks import ModelMasks
from loraprune.pruning.schedule import PruningSchedule
from loraprune.pruning.target import GlobalTarget, PruneTarget, solve_model_target
from loraprune.training.checkpoint import LoadedCheckpoint, load_checkpoint, load_trained_state, model_fingerprint
from loraprune.training.lora import check_base_precision, wrap_with_lora
from loraprune.training.recipe import RunInterrupted, TrainingOutcome, train_while_pruning
from loraprune.training.run_folder import PARTIAL_SUFFIX, partial_dir
from loraprune.training.sharding import full_state

RUN_SUBDIR = "run"
RUN_REPORT = "report.json"  # the run's own report, in its run folder: a re-export carries it over
FIDELITY_TOKENS = 4096  # out-of-domain tokens the pruned logits are compared with the dense ones on
EXPORT_PROBE_TOKENS = 128  # validation text the exported model's logits are checked on
DEFAULT_GGUF_TYPE = "f32"
# Every export format holds a different width in every layer: transformers as a DeciLM folder.
PER_LAYER_FORMATS = EXPORT_FORMATS


@dataclass
class PruneResult:
    """A finished run: where the pruned checkpoint is and how good it is."""

    output_dir: Path
    target: PruneTarget | GlobalTarget
    achieved_sparsity: float
    dense_perplexity: PerplexityResult
    pruned_perplexity: PerplexityResult
    report: dict
    main_process: bool = True  # False in the other processes of a data-parallel run
    out_of_domain: dict | None = None  # {"before", "after"}: see evaluation.harness.out_of_domain_report


def _run_folders(out: Path | None, resume: Path | bool) -> tuple[Path, Path]:
    """(output checkpoint folder, run folder) for a new run or the one being resumed."""
    if isinstance(resume, Path):
        run_dir = resume if resume.name.endswith(PARTIAL_SUFFIX) else partial_dir(resume)
        if not run_dir.is_dir():
            raise LoraPruneError(f"nothing to resume at {resume}: no {run_dir.name} folder; "
                                 "start without --resume")
        return run_dir.with_name(run_dir.name[: -len(PARTIAL_SUFFIX)]), run_dir
    if out is None:
        raise LoraPruneError("--out is required: the folder the pruned model is written to")
    return out, partial_dir(out)


def _check_folders(out: Path, run_dir: Path, resuming: bool, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise LoraPruneError(f"output folder {out} exists; pass --overwrite or choose another --out")
    if run_dir.exists() and not resuming and not overwrite:
        raise LoraPruneError(f"an interrupted run is in {run_dir}; pass --resume to continue it, "
                             "or --overwrite to start again")


def _checked_resume(run_dir: Path, config: PruneConfig | None) -> tuple[LoadedCheckpoint, PruneConfig]:
    checkpoint = load_checkpoint(run_dir)
    saved = PruneConfig.from_dict(checkpoint.state.config)
    if config is None:
        return checkpoint, saved
    changed = saved.result_changing_differences(config)
    if changed:
        raise LoraPruneError(f"cannot resume with changed settings ({', '.join(changed)}); "
                             f"rerun with the settings recorded in {run_dir}/checkpoint/state.json "
                             "or start a new run")
    return checkpoint, config  # differs from the saved one only where the result does not


def saved_run_config(run: str | Path | None) -> PruneConfig:
    """The settings recorded by the run that ``run`` (a run folder or its --out) refers to."""
    if run is None:
        raise LoraPruneError("--resume needs the run folder (or pass the --out the run was writing)")
    _, run_dir = _run_folders(None, Path(run))
    return PruneConfig.from_dict(load_checkpoint(run_dir).state.config)


def run_report(config: PruneConfig, steps: int) -> dict:
    """What every exported model's loraprune.json says about the run that made it."""
    return {"source_model": config.model, "criterion": config.criterion, "data": config.data, "steps": steps,
            "seed": config.seed, "target_sparsity": config.sparsity, "config": config.to_dict()}


def _evaluate(model, tokenizer, config: PruneConfig, progress: bool,
              generated: GeneratedText | None = None) -> PerplexityResult:
    """Perplexity on the corpus's validation text; for --data self alone, on the held-out samples."""
    spec = parse_data(config.data)
    if not spec.validation_generated:
        return evaluate_perplexity(model, tokenizer, spec.corpus, config.eval_seq_len, config.eval_tokens,
                                   austen_dir=config.austen_dir, progress=progress)
    # Held-out samples are scored as generated, one block per window (--seq-len, not --eval-seq-len).
    windows = max(1, config.eval_tokens // config.seq_len)
    result = perplexity(model, generated.validation[:windows], progress=progress)
    result.data, result.split = config.data, "validation"
    return result


def _generated_text(model, tokenizer, config: PruneConfig, spec: DataSpec, run_dir: Path, resuming: bool,
                    processes: PartialState, progress: bool) -> GeneratedText | None:
    """The run's self-generated blocks: read back on --resume, else sampled on the main process and shared."""
    if not spec.with_self:
        return None
    if resuming:
        return _saved_samples(run_dir, SELF_FILE)

    def sample() -> GeneratedText:
        samples_per_step = config.batch_size * config.grad_accumulation * processes.num_processes
        n_train = self_block_count(config.steps, samples_per_step, spec.corpus is not None, config.self_tokens,
                                   config.seq_len)
        n_validation = max(1, round(n_train * VALIDATION_FRACTION)) if spec.validation_generated else 0
        user_ids = corpus_ids(tokenizer, load_corpus(spec.corpus, "train", config.austen_dir)) if spec.corpus else None
        return generate_text(model, tokenizer, n_train, n_validation, config.seq_len, config.seed, user_ids, progress)

    return _sampled_on_main(sample, processes)


def _scoring_samples(model, tokenizer, config: PruneConfig, schedule: PruningSchedule, run_dir: Path,
                     resuming: bool, processes: PartialState, progress: bool) -> GeneratedText | None:
    """``--calibration self``: one block from BOS per sample the ramp scores; read back on --resume."""
    if config.calibration is None or SELF not in calibration_sources(config.calibration):
        return None
    if resuming:
        return _saved_samples(run_dir, CALIBRATION_FILE)

    def sample() -> GeneratedText:
        scored = scoring_block_count(schedule.scored_steps(every=config.calibration_every),
                                     config.batch_size * config.grad_accumulation * processes.num_processes)
        blocks = scoring_text(model, tokenizer, scored, config.seq_len, config.seed, progress)
        return GeneratedText(blocks, blocks[:0])  # nothing held out: no one validates on scoring text

    return _sampled_on_main(sample, processes)


def _saved_samples(run_dir: Path, name: str) -> GeneratedText:
    saved = GeneratedText.load(run_dir, name)
    if saved is None:
        raise LoraPruneError(f"the run in {run_dir} has no self-generated text to resume with; start it again "
                             f"({name} is missing)")
    return saved


def _sampled_on_main(sample, processes: PartialState) -> GeneratedText:
    """The main process samples; under torchrun every process then works on the same blocks."""
    generated = sample() if processes.is_main_process else None
    if processes.num_processes > 1:
        shared = [generated]
        broadcast_object_list(shared)
        generated = shared[0]
    return generated


def resolved_allocation(config: PruneConfig) -> PruneConfig:
    """Settle ``allocation="auto"``: global for every export format (it wins on quality, see
    benchmarks/quality.py; transformers gets a DeciLM folder) and under --max-layer-sparsity (a cap
    on it), uniform with no export."""
    if config.allocation != "auto":
        return config
    per_layer = (config.export and config.export_format in PER_LAYER_FORMATS) or config.max_layer_sparsity is not None
    return config.with_overrides({"allocation": "global" if per_layer else "uniform"})


def finished_as(config: PruneConfig, export: bool | None = None, export_format: str | None = None,
                gguf_type: str | None = None) -> PruneConfig:
    """The run's settings with the way it ends (write a model? which format and GGUF type?) replaced
    by what a command passed; a format named without a GGUF type drops the recorded type."""
    if export_format is not None and export_format != config.export_format:
        config = config.with_overrides({"export_format": export_format, "gguf_type": None})
    if gguf_type is not None:
        config = config.with_overrides({"gguf_type": gguf_type})
    if export is not None or export_format is not None:  # naming a format asks for the model
        config = config.with_overrides({"export": export if export is not None else True})
    return config


def resolved_round_to(config: PruneConfig) -> PruneConfig:
    """Settle ``round_to=None``: the row multiple a quantised GGUF type needs (down_proj's rows are the
    kept FFN width), else 1."""
    if config.round_to is not None:
        return config
    gguf = config.export and config.export_format == "gguf"
    return config.with_overrides({"round_to": default_round_to(config.gguf_type or DEFAULT_GGUF_TYPE) if gguf else 1})


def _settled(config: PruneConfig, export: bool | None, export_format: str | None, gguf_type: str | None
             ) -> PruneConfig:
    """The config with how the run ends, its allocation and its --round-to made concrete."""
    return resolved_round_to(resolved_allocation(finished_as(config, export, export_format, gguf_type)))


def _check_format_fits(model, tokenizer, config: PruneConfig, export_format: str, gguf_type: str,
                       before_training: bool = True) -> None:
    """Refuse, before training, a model or tokenizer the chosen format cannot hold (after training, the
    GGUF writer checks the widths the run chose)."""
    skips = [f"--skip-{end} {n}" for end, n in (("first", config.skip_first_layers), ("last", config.skip_last_layers))
             if n]
    per_layer = skips + (["--allocation global"] if config.allocation == "global" else [])
    if export_format == "nemotron-nas":
        check_nemotron_nas(model.config)
    if export_format == "transformers" and per_layer:
        try:
            check_nemotron_nas(model.config)
        except LoraPruneError as e:
            fixes = (["pass --allocation uniform"] if config.allocation == "global" else []) + (
                [f"drop {' and '.join(skips)}"] if skips else [])
            raise LoraPruneError(f"per-layer widths (from {' and '.join(per_layer)}) are written as a DeciLM folder, "
                                 f"which cannot hold this model ({str(e).split(';')[0]}); {' and '.join(fixes)} "
                                 "for a plain folder of one width") from e
    if export_format == "gguf":
        check_gguf_type(gguf_type)
        check_no_bias_compensation(config.bias_compensation)
        if before_training:
            note = check_reachable_widths_fit(gguf_type, LayerShape.from_config(model.config), config.round_to,
                                              config.attention_unit, config.attention_fraction)
            if note:
                print(f"loraprune: note: {note}", file=sys.stderr)
        check_architecture(model, spec_for(model.config))
        check_vocab(tokenizer, source_gguf_file(config.model))


def _export(model, tokenizer, masks: ModelMasks, report: dict, out: Path, config: PruneConfig, *,
            export_format: str, gguf_type: str, overwrite: bool, check_logits: bool = True,
            run_dir: Path | None = None) -> Path:
    """Write the model in the chosen format, validated before it is put in place."""
    return export_model(ExportRequest(model, masks, tokenizer, report, out, format=export_format, overwrite=overwrite,
                                      check_logits=check_logits, probe=export_probe(tokenizer, config, run_dir),
                                      gguf_type=gguf_type, source_gguf=source_gguf_file(config.model),
                                      repetition_penalty=(report.get("decoding") or {}).get("repetition_penalty")))


def prune(config: PruneConfig | None = None, out: str | Path | None = None, *,
          resume: bool | str | Path = False, overwrite: bool = False, export: bool | None = None,
          progress: bool = True, export_format: str | None = None, gguf_type: str | None = None) -> PruneResult:
    """Prune ``config.model`` while fine-tuning LoRA and write the smaller model to ``out``.

    ``export_format`` "transformers" writes a Hugging Face folder, "gguf" ``out/model.gguf`` for
    llama.cpp (weights in ``gguf_type``: f32, f16, q8_0, q6_k, q5_k_m, q4_k_m or q4_0), "nemotron-nas" a
    folder vLLM loads as DeciLMForCausalLM (per-layer widths; pruned query heads are zero slots).
    ``export``, ``export_format`` and ``gguf_type`` replace the config's when given; the run records
    them, so a resumed run finishes as it was started.
    """
    out_path = Path(out) if out is not None else None
    if config is not None:  # concrete before a resumed run's settings are compared with it
        config = _settled(config, export, export_format, gguf_type)
    resume_arg = Path(resume) if isinstance(resume, (str, Path)) else resume
    if resume_arg is True and out_path is not None:
        resume_arg = out_path
    out_path, run_dir = _run_folders(out_path, resume_arg)
    resuming = bool(resume_arg)
    checkpoint = None
    if resuming:
        checkpoint, config = _checked_resume(run_dir, config)
    config = _settled(config or PruneConfig(), export, export_format, gguf_type)
    config.validate()
    export, export_format, gguf_type = config.export, config.export_format, config.gguf_type or DEFAULT_GGUF_TYPE
    check_base_precision(config)
    schedule = PruningSchedule.for_config(config)
    _check_folders(out_path, run_dir, resuming, overwrite)
    check_creatable(out_path)

    # Everything that can fail on bad input happens before a folder is created.
    spec = parse_data(config.data)
    if spec.corpus is not None:
        train_corpus = load_corpus(spec.corpus, "train", config.austen_dir)
        load_corpus(spec.corpus, "validation", config.austen_dir)
    calibration_names = calibration_sources(config.calibration) if config.calibration else []
    calibration_texts = {name: load_corpus(name, "train", config.austen_dir)
                         for name in calibration_names if name != SELF}
    model, tokenizer = load_model(config.model, config.dtype, config.base_bits)
    spec_for(model.config)
    if export:
        _check_format_fits(model, tokenizer, config, export_format, gguf_type)
    solve_model_target(model, config)
    train_blocks = corpus_blocks(tokenizer, train_corpus, config.seq_len) if spec.corpus is not None else None
    if checkpoint is not None and checkpoint.state.model_fingerprint != model_fingerprint(model):
        raise LoraPruneError(f"the checkpoint in {run_dir} was made from another model than the one now at "
                             f"{config.model}; put the model the run was started from back at that path")

    # Under torchrun / accelerate launch every process trains; only the main one writes files.
    processes = PartialState(cpu=not torch.cuda.is_available())
    if config.parallel == "fsdp" and processes.num_processes == 1:
        print("loraprune: note: --parallel fsdp shards the model across the processes of torchrun or accelerate "
              "launch; this is one process, so it runs unsharded", file=sys.stderr)
    main_progress = progress and processes.is_main_process
    generated = _generated_text(model, tokenizer, config, spec, run_dir, resuming, processes, main_progress)
    scoring_samples = _scoring_samples(model, tokenizer, config, schedule, run_dir, resuming, processes,
                                       main_progress)
    dense = _evaluate(model, tokenizer, config, main_progress, generated)
    seen_text = config.data + (f"+{config.calibration}" if config.calibration else "")
    ood = out_of_domain_blocks(tokenizer, seen_text, config.eval_seq_len, config.eval_tokens, config.austen_dir)
    ood_before = out_of_domain_report(model, tokenizer, ood)
    samples_before = greedy_samples(model, tokenizer)
    if processes.is_main_process:
        if run_dir.exists() and not resuming:
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if generated is not None and not resuming:
            generated.save(run_dir)
        if scoring_samples is not None and not resuming:
            scoring_samples.save(run_dir, CALIBRATION_FILE)
    processes.wait_for_everyone()
    sources = [blocks for blocks in (train_blocks, generated.train if generated else None) if blocks is not None]
    calibration = [scoring_samples.train if name == SELF else corpus_blocks(tokenizer, calibration_texts[name],
                                                                            config.seq_len)
                   for name in calibration_names]
    outcome = train_while_pruning(model, sources, config, run_dir, checkpoint, progress, calibration_blocks=calibration)
    outcome.model.eval()
    pruned = _evaluate(outcome.model, tokenizer, config, main_progress, generated)
    ood_after = out_of_domain_report(outcome.model, tokenizer, ood, dense_view(outcome.model, outcome.masks),
                                     FIDELITY_TOKENS // config.eval_seq_len)
    decoding = _decoding_default(outcome, tokenizer, config)
    penalty = decoding["repetition_penalty"]
    samples = [{"prompt": prompt, "before": before, "after": after} for prompt, before, after
               in zip(SAMPLE_PROMPTS, samples_before, greedy_samples(outcome.model, tokenizer))]
    if penalty != 1.0:
        for sample, shipped in zip(samples, greedy_samples(outcome.model, tokenizer, repetition_penalty=penalty)):
            sample["after_with_penalty"] = shipped
    report = {**run_report(config, outcome.steps),
              "achieved_sparsity": outcome.achieved_sparsity,
              "kept_per_layer": outcome.masks.kept_counts(),
              "perplexity_before": dense.to_dict(),
              "perplexity_after": pruned.to_dict(),
              "greedy_samples": samples,
              "decoding": decoding,
              "out_of_domain": {"before": ood_before, "after": ood_after,
                                "seen_while_pruning": ood is not None and ood[0] in seen_text.split("+")},
              "processes": _processes_report(config, processes.num_processes, outcome)}
    # Sharded, the main process rebuilds the whole model: the frozen base from disk, the adapter gathered.
    adapter = full_state(get_peft_model_state_dict(outcome.model)) if export and outcome.sharded else None
    if processes.is_main_process:
        (run_dir / RUN_REPORT).write_text(json.dumps(report, indent=2) + "\n")
    if export and processes.is_main_process:
        exported = adapted_model(config, adapter) if outcome.sharded else outcome.model
        with _run_kept_on_failed_check(run_dir, out_path), _finish_command_on_interrupt(run_dir):
            _export(exported, tokenizer, outcome.masks, report, out_path, config,
                    export_format=export_format, gguf_type=gguf_type, overwrite=overwrite, run_dir=run_dir)
        os.replace(run_dir, out_path / RUN_SUBDIR)
    processes.wait_for_everyone()
    return PruneResult(out_path, outcome.target, outcome.achieved_sparsity, dense, pruned, report,
                       processes.is_main_process, report["out_of_domain"])


def _decoding_default(outcome: TrainingOutcome, tokenizer, config: PruneConfig) -> dict:
    """The repetition penalty the model ships with (measured unless --repetition-penalty gives it), and
    the health prompts' repetition under it: prompts it was not chosen on."""
    if config.repetition_penalty is not None:
        choice = given_repetition_penalty(config.repetition_penalty)
    else:
        choice = choose_repetition_penalty(outcome.model, tokenizer, tuning_prompts(tokenizer),
                                           dense_view(outcome.model, outcome.masks))
    penalty = choice.repetition_penalty
    health = generation_health(outcome.model, tokenizer, repetition_penalty=penalty) if penalty != 1.0 else None
    return {**choice.to_dict(), "generation": health.to_dict() if health is not None else None}


def _processes_report(config: PruneConfig, count: int, outcome: TrainingOutcome) -> dict:
    most, whole = outcome.frozen_bytes
    return {"count": count, "parallel": "fsdp" if outcome.sharded else "replicate",
            "frozen_weight_bytes_per_process": most, "frozen_weight_bytes": whole}


def adapted_model(config: PruneConfig, adapter: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The run's base model, loaded whole, with its trained LoRA adapter."""
    model, _ = load_model(config.model, config.dtype, config.base_bits)
    peft_model = wrap_with_lora(model, config, spec_for(model.config))
    set_peft_model_state_dict(peft_model, adapter)
    return peft_model


def export_run(run: str | Path, out: str | Path, *, overwrite: bool = False, check_logits: bool = True,
               export_format: str | None = None, gguf_type: str | None = None) -> Path:
    """Export the model of a saved run (finished or interrupted) as a standard checkpoint or a GGUF file.

    ``export_format`` and ``gguf_type`` default to the ones the run recorded. With ``check_logits``
    False, a logit comparison that fails is recorded in loraprune.json instead of stopping the export.
    """
    run = Path(run)
    run_dir = run / RUN_SUBDIR if (run / RUN_SUBDIR).is_dir() else run
    _refuse_writing_over_the_run(run, run_dir, Path(out))
    check_creatable(Path(out))
    checkpoint = load_trained_state(run_dir)
    config = finished_as(PruneConfig.from_dict(checkpoint.state.config), True, export_format, gguf_type)
    config.validate()
    export_format, gguf_type = config.export_format, config.gguf_type or DEFAULT_GGUF_TYPE
    try:
        model, tokenizer = load_model(config.model, config.dtype, config.base_bits)
    except LoraPruneError as e:
        raise LoraPruneError(f"{e}; that base model path is the one recorded in the run's checkpoint "
                             f"({run_dir}/checkpoint/state.json): put the model back there") from None
    _check_format_fits(model, tokenizer, config, export_format, gguf_type, before_training=False)
    if checkpoint.state.model_fingerprint != model_fingerprint(model):
        raise LoraPruneError(f"the run in {run_dir} was made from another model than the one now at {config.model} "
                             "(the path its checkpoint records); put the original model back at that path")
    spec = spec_for(model.config)
    peft_model = wrap_with_lora(model, config, spec)
    set_peft_model_state_dict(peft_model, checkpoint.adapter)
    masks = ModelMasks.for_model(peft_model)
    masks.load_state_dict(checkpoint.masks)
    report = {**_saved_run_report(run_dir), **run_report(config, checkpoint.state.step),
              "finished": checkpoint.state.step >= config.steps}
    if "decoding" not in report and config.repetition_penalty is not None:  # a run that stopped before choosing
        report["decoding"] = given_repetition_penalty(config.repetition_penalty).to_dict()
    with _run_kept_on_failed_check(run_dir, Path(out)):
        return _export(peft_model, tokenizer, masks, report, Path(out), config, export_format=export_format,
                       gguf_type=gguf_type, overwrite=overwrite, check_logits=check_logits, run_dir=run_dir)


def _saved_run_report(run_dir: Path) -> dict:
    """What the prune measured and reported about its run (sparsity, perplexities, samples...); {} if it did not finish."""
    path = run_dir / RUN_REPORT
    return json.loads(path.read_text()) if path.is_file() else {}


def _refuse_writing_over_the_run(run: Path, run_dir: Path, out: Path) -> None:
    """An --out that is the run, holds it or lies inside it would replace the run it is exported from."""
    out = out.resolve()
    for folder in {run.resolve(), run_dir.resolve()}:
        if out == folder or out in folder.parents or folder in out.parents:
            raise LoraPruneError(f"--out {out} would overwrite the run it exports ({run_dir}); "
                                 "choose an --out outside it")


def export_probe(tokenizer, config: PruneConfig, run_dir: Path | None = None) -> torch.Tensor:
    """The first EXPORT_PROBE_TOKENS tokens of the run's validation text, shape (1, tokens)."""
    spec = parse_data(config.data)
    if spec.corpus is None:  # --data self alone: the held-out samples saved in the run folder
        saved = GeneratedText.load(run_dir) if run_dir is not None else None
        if saved is None:
            raise LoraPruneError(f"the run in {run_dir} has no self-generated text ({config.data}) to check the export on")
        return saved.validation.reshape(-1)[:EXPORT_PROBE_TOKENS][None]
    ids = corpus_ids(tokenizer, load_corpus(spec.corpus, "validation", config.austen_dir))
    return torch.from_numpy(ids[:EXPORT_PROBE_TOKENS].astype(np.int64))[None]


@contextmanager
def _finish_command_on_interrupt(run_dir: Path) -> Iterator[None]:
    """Ctrl-C while the model is written: the run is whole, so say how to finish it."""
    try:
        yield
    except KeyboardInterrupt:
        raise RunInterrupted(f"interrupted while writing the model; the trained run is kept in {run_dir}. "
                             f"Finish it with: loraprune prune --resume {run_dir}") from None


@contextmanager
def _run_kept_on_failed_check(run_dir: Path, out: Path) -> Iterator[None]:
    """Turn a failed logit check into an error that says the run is safe and how to export it anyway."""
    try:
        yield
    except LogitCheckFailed as failed:
        raise LoraPruneError(f"{failed}. The run is kept in {run_dir}; `loraprune export {run_dir} --out {out} "
                             "--skip-logit-check` writes the model anyway and records the difference") from None
