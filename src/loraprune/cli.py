"""The ``loraprune`` command: parses arguments and makes one library call per subcommand.

A subcommand is a pair of functions in COMMANDS: one adds its arguments, one runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from loraprune import __version__
from loraprune.errors import LoraPruneError, first_line
from loraprune.quiet import quiet_third_party

EXIT_INTERRUPTED = 130
EXIT_PEER_LOST = 1  # not the user's input: exit code 1, as a crash, but in one line


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model and --dtype, shared by every subcommand that loads a model."""
    parser.add_argument(
        "--model",
        default="smollm2-135m",
        help="built-in 'smollm2-135m', a Hugging Face model folder, a .gguf file or a hub id (default: %(default)s)",
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="weight dtype (default: %(default)s)",
    )


def add_data_arguments(parser: argparse.ArgumentParser, default_data: str) -> None:
    """--data, --austen-dir, --seq-len and --max-tokens, shared by commands that read text."""
    parser.add_argument(
        "--data",
        default=default_data,
        help="austen, pydoc, text:PATH, or (with loraprune[eval] and network) wikitext2, ptb, c4, "
        "alpaca (default: %(default)s)",
    )
    parser.add_argument(
        "--austen-dir",
        default=None,
        help="folder with the Austen novels (default: $LORAPRUNE_AUSTEN_DIR or a "
        "shared/data/austen found in this folder or a parent)",
    )
    parser.add_argument("--seq-len", type=int, default=512, help="window length in tokens (default: %(default)s)")
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="use only the first N tokens of the text (default: all)",
    )


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `loraprune eval`."""
    add_model_arguments(parser)
    add_data_arguments(parser, default_data="pydoc")
    parser.add_argument(
        "--split",
        default="validation",
        choices=["validation", "train"],
        help="which part of the text to score (default: %(default)s)",
    )
    parser.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--tasks", default=None,
                        help="comma-separated lm-eval tasks (e.g. boolq,piqa) instead of perplexity; "
                        "needs loraprune[eval]")
    parser.add_argument("--limit", type=int, default=None, help="with --tasks: examples per task")
    parser.add_argument("--include-path", default=None, help="with --tasks: folder of extra task YAMLs")


def eval_command(args: argparse.Namespace) -> int:
    """Measure perplexity and print it with the text, window length and token count."""
    from loraprune.evaluation.perplexity import evaluate_model

    if args.tasks:
        return zeroshot_command(args)
    result = evaluate_model(
        model=args.model,
        data=args.data,
        seq_len=args.seq_len,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
        dtype=args.dtype,
        split=args.split,
        austen_dir=args.austen_dir,
        progress=not args.no_progress,
    )
    if args.json:
        print(json.dumps({"model": args.model, **result.to_dict()}))
    else:
        print(
            f"perplexity {result.ppl:.3f} on {result.data} ({result.split}), "
            f"{result.n_windows} windows of {result.seq_len} tokens, "
            f"{result.n_tokens} tokens predicted, {result.tokens_per_second:.0f} tokens/s"
        )
    return 0


def zeroshot_command(args: argparse.Namespace) -> int:
    """`loraprune eval --tasks`: zero-shot accuracy through lm-evaluation-harness."""
    from loraprune.evaluation.zeroshot import format_results, run_tasks

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    result = run_tasks(args.model, tasks, limit=args.limit, batch_size=args.batch_size,
                       include_path=args.include_path, dtype=args.dtype)
    print(json.dumps(result) if args.json else format_results(result))
    return 0


# Options of `loraprune prune` that map one-to-one onto PruneConfig fields (lora_* onto its LoRA part).
PRUNE_SETTINGS = (
    "model", "data", "austen_dir", "self_tokens", "dtype", "base_bits", "sparsity", "attention_unit", "attention_fraction",
    "skip_first_layers", "skip_last_layers", "round_to", "criterion", "score_power", "ema", "steps",
    "warmup_fraction", "cooldown_fraction", "prune_every", "lr", "lr_schedule", "batch_size",
    "grad_accumulation", "seq_len", "seed", "lora_rank", "lora_alpha", "lora_dropout", "eval_tokens",
    "eval_seq_len", "save_every", "lora_columns", "distill", "distill_temperature", "distill_top_k", "allocation",
    "parallel", "bias_compensation", "calibration", "calibration_every", "repetition_penalty",
    "fisher_window", "max_layer_sparsity",
)


def _parse_repetition_penalty(value: str) -> float | str:
    """--repetition-penalty: "auto" (mapped to the config's None once flags are merged), off (1.0) or a number."""
    if value in ("auto", "off"):
        return "auto" if value == "auto" else 1.0
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, off or a number, got {value!r}") from None


def add_prune_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `loraprune prune`; defaults come from PruneConfig."""
    from loraprune.config import ALLOCATIONS, CRITERIA, PruneConfig

    d = PruneConfig()
    parser.add_argument("--model", default=None, help=f"model to prune, any form eval takes (default: {d.model})")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help=f"weight dtype (default: {d.dtype}); LoRA, its optimizer state and scores stay float32")
    parser.add_argument("--base-bits", type=int, default=None, choices=[8, 4],
                        help="quantise the frozen projections to 8 or 4 bits (bitsandbytes; CPU and CUDA); "
                             "criteria lora and fisher only (default: not quantised)")
    parser.add_argument("--data", default=None,
                        help="training/validation text, as for eval, or 'self' (text the dense model samples "
                        "before training; validated on held-out samples) or NAME+self (blocks alternate "
                        f"between NAME and samples; validated on NAME) (default: {d.data})")
    parser.add_argument("--self-tokens", type=int, default=None,
                        help="tokens the model samples for --data self / NAME+self (default: one block per "
                        "sample trained on: steps x batch x grad-accumulation x processes, half when mixed)")
    parser.add_argument("--calibration", default=None,
                        help="text the units are scored on, if not --data: corpora and 'self' joined by '+' "
                        "(e.g. austen+pydoc, austen+self). The units that survive are the ones this text needs, "
                        "so give it everything the pruned model must keep doing; 'self' is text the dense model "
                        "samples from BOS before training (one block per scored sample, kept in the run "
                        "folder), a stand-in for everything it was trained on. LoRA still trains on --data "
                        "only (criterion fisher; default: --data)")
    parser.add_argument("--calibration-every", type=int, default=None, metavar="K",
                        help="score the --calibration text on every K-th step of the ramp only: its extra "
                        "forward and backward then cost 1/K as much, and self samples 1/K as many blocks "
                        f"(default: {d.calibration_every})")
    parser.add_argument("--repetition-penalty", type=_parse_repetition_penalty, default=None, metavar="auto|off|X",
                        help="decoding default written with the model (generation_config.json; GGUF: "
                        "general.sampling.penalty_repeat): auto tries 1.05, 1.1, ... and keeps the mildest under "
                        "which the pruned model repeats itself no more than the dense one, prompt by prompt (within "
                        "0.01 on average; greedy, on 12 fixed prompts of prose, code, facts and chat); off ships "
                        "none (default: auto)")
    parser.add_argument("--austen-dir", default=None, help="folder with the Austen novels")
    parser.add_argument("--out", default=None, help="folder the pruned checkpoint is written to")
    parser.add_argument("--sparsity", type=float, default=None,
                        help=f"fraction of ALL parameters (embeddings included) to remove (default: {d.sparsity})")
    parser.add_argument("--criterion", default=None, choices=CRITERIA,
                        help=f"importance criterion; lora is LoRAPrune's (default: {d.criterion})")
    parser.add_argument("--score", dest="score_power", default=None, choices=["square", "abs"],
                        help="element score (G*W)^2 as in the paper, or |G*W| as in its code")
    parser.add_argument("--no-normalise", action="store_true",
                        help="do not L2-normalise each matrix's group scores before summing")
    parser.add_argument("--lora-rows-only", dest="lora_columns", action="store_const", const=False, default=None,
                        help="with --criterion lora, score q/k/v and gate/up rows only: the rank-r estimate of "
                        "o_proj/down_proj columns is mostly noise (the paper sums rows and columns)")
    parser.add_argument("--distill", type=float, default=None, metavar="W",
                        help="weight of self-distillation from the unpruned model: loss = (1-W)*cross-entropy "
                        f"+ W*KL(teacher||student) (default: {d.distill})")
    parser.add_argument("--distill-temperature", type=float, default=None, metavar="T",
                        help="softmax temperature of the distillation; the KL is scaled by T^2 "
                        f"(default: {d.distill_temperature})")
    parser.add_argument("--distill-top-k", type=int, default=None, metavar="K",
                        help="distil on the teacher's K likeliest tokens of each position only, both "
                        "distributions renormalised over them (default: the whole vocabulary)")
    parser.add_argument("--bias-compensation", action="store_const", const=True, default=None,
                        help="a removed head or FFN channel keeps its mean output (over the training tokens it saw "
                        "while kept), folded into the bias of o_proj/down_proj on export (FLAP's compensation); "
                        "not with --format gguf")
    parser.add_argument("--attention-unit", default=None, choices=["kv_group", "query_head"],
                        help="remove whole KV groups, or query heads inside each KV group")
    parser.add_argument("--attention-fraction", type=float, default=None,
                        help="share of attention units to remove (default: balanced with the FFN)")
    parser.add_argument("--allocation", default=None, choices=ALLOCATIONS,
                        help="uniform: every pruned layer keeps the same widths; global: units of all layers "
                        "compete on estimated loss per parameter, each layer keeps its own widths; auto: global "
                        "for every --format (transformers: a DeciLM folder), uniform with --no-export; uniform "
                        "gives a plain Llama folder that needs no remote code "
                        f"(default: {d.allocation})")
    parser.add_argument("--max-layer-sparsity", type=float, default=None, metavar="F",
                        help="global allocation: no pruned layer loses more than this share of its attention and FFN "
                        "parameters (default: no cap beyond one attention unit and --round-to channels kept)")
    parser.add_argument("--skip-first", dest="skip_first_layers", type=int, default=None,
                        help="leave the first N layers unpruned (per-layer widths)")
    parser.add_argument("--skip-last", dest="skip_last_layers", type=int, default=None,
                        help="leave the last N layers unpruned (per-layer widths)")
    parser.add_argument("--round-to", type=int, default=None,
                        help="kept FFN width is a multiple of N (default: what --gguf-type needs: 32 for q8_0 and "
                        "q4_0, 256 for the K-quants, else 1)")
    parser.add_argument("--steps", type=int, default=None, help=f"optimizer steps (default: {d.steps})")
    parser.add_argument("--warmup", dest="warmup_fraction", type=float, default=None,
                        help=f"fraction of steps before pruning starts (default: {d.warmup_fraction})")
    parser.add_argument("--cooldown", dest="cooldown_fraction", type=float, default=None,
                        help="fraction of steps after the target is reached (masks frozen; default: "
                        f"{d.cooldown_fraction})")
    parser.add_argument("--prune-every", type=int, default=None, help="steps between mask updates")
    parser.add_argument("--ema", type=float, default=None, help="moving-average decay of scores")
    parser.add_argument("--fisher-window", type=int, default=None, metavar="N",
                        help="fisher: square the mask gradient of every N tokens instead of every sequence "
                        "(default: whole sequences)")
    parser.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default: {d.lr})")
    parser.add_argument("--lr-schedule", default=None, choices=["linear", "cosine", "constant"])
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--grad-accumulation", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None, help="training block length in tokens")
    parser.add_argument("--lora-rank", type=int, default=None)
    parser.add_argument("--lora-alpha", type=float, default=None)
    parser.add_argument("--lora-dropout", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--parallel", default=None, choices=["replicate", "fsdp"],
                        help="under torchrun / accelerate launch: a whole model per process (replicate), or "
                        f"every weight sharded across the processes with FSDP2 (fsdp) (default: {d.parallel})")
    parser.add_argument("--eval-tokens", type=int, default=None,
                        help="validation tokens for perplexity before and after")
    parser.add_argument("--eval-seq-len", type=int, default=None, help="perplexity window length")
    parser.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps")
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN_DIR",
                        help="continue an interrupted run (its RUN_DIR, or the --out it was writing)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--no-export", action="store_true",
                        help="keep only the run folder (masks, adapter); recorded, as --format and --gguf-type are")
    add_format_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def add_format_arguments(parser: argparse.ArgumentParser) -> None:
    """--format and --gguf-type, shared by `prune` and `export`."""
    from loraprune.config import GGUF_TYPE_NAMES

    parser.add_argument("--format", dest="export_format", default=None,
                        choices=["transformers", "gguf", "nemotron-nas"],
                        help="transformers: a Hugging Face folder, plain Llama when every layer has the same widths, "
                        "else DeciLM (loads with trust_remote_code, in transformers and vLLM); gguf: "
                        "OUT/model.gguf for llama.cpp; nemotron-nas: always the DeciLM folder (default: the "
                        "run's, else transformers)")
    parser.add_argument("--gguf-type", default=None, choices=list(GGUF_TYPE_NAMES),
                        help="with --format gguf: weight type of the file; q6_k, q5_k_m, q4_k_m and q4_0 are made "
                        "by llama.cpp's quantizer (llama-cpp-python) (default: the run's, else f32)")


def prune_command(args: argparse.Namespace) -> int:
    """Prune while fine-tuning LoRA, export, and print perplexity before and after."""
    from loraprune.config import PruneConfig
    from loraprune.job import prune, saved_run_config

    overrides = {name: getattr(args, name) for name in PRUNE_SETTINGS if getattr(args, name) is not None}
    overrides["normalise_scores"] = False if args.no_normalise else None
    base = saved_run_config(args.resume if isinstance(args.resume, str) else args.out) if args.resume else PruneConfig()
    config = base.with_overrides({k: None if v == "auto" else v for k, v in overrides.items() if v is not None})
    result = prune(config, args.out, resume=args.resume, overwrite=args.overwrite,
                   export=False if args.no_export else None, progress=not args.no_progress,
                   export_format=args.export_format, gguf_type=args.gguf_type)
    if not result.main_process:  # under torchrun every process ran the job; one reports it
        return 0
    before, after = result.dense_perplexity, result.pruned_perplexity
    print(f"achieved whole-model sparsity {result.achieved_sparsity:.4f} (target {result.report['target_sparsity']})")
    print(f"perplexity on {before.data} ({before.split}), {before.n_windows} windows of {before.seq_len} tokens, "
          f"{before.n_tokens} tokens: dense {before.ppl:.3f} -> pruned {after.ppl:.3f}")
    _print_out_of_domain(result.out_of_domain)
    _print_decoding(result.report["decoding"])
    for sample in result.report["greedy_samples"]:
        print(f"{sample['prompt']!r}\n  dense:  {sample['before']!r}\n  pruned: {sample['after']!r}"
              + (f"\n  pruned, repetition penalty {result.report['decoding']['repetition_penalty']:g}: "
                 f"{sample['after_with_penalty']!r}" if "after_with_penalty" in sample else ""))
    if result.report["config"]["export"]:
        print(f"pruned model written to {result.output_dir}")
        print(written_kind(result.output_dir))
    return 0


def written_kind(folder: Path) -> str:
    """Which kind of folder was written and the lines of Python that load it; for a GGUF, its type and size."""
    config_file = Path(folder) / "config.json"
    if not config_file.is_file():
        return gguf_summary(folder)
    per_layer = "DeciLMForCausalLM" in json.loads(config_file.read_text()).get("architectures", [])
    kind = ("a DeciLM folder (per-layer widths; its modeling code ships in the folder, so transformers needs "
            "trust_remote_code; --allocation uniform writes a plain Llama folder instead)" if per_layer else
            "a plain transformers folder (one width for all layers)")
    remote = ", trust_remote_code=True" if per_layer else ""
    return (f"written as {kind}; load it with:\n  from transformers import AutoModelForCausalLM\n"
            f"  model = AutoModelForCausalLM.from_pretrained({str(folder)!r}{remote})")


def gguf_summary(folder: Path) -> str:
    """The written GGUF's weight type, projection types and size against the dense model's weights in f16."""
    report_file = Path(folder) / "loraprune.json"
    if not report_file.is_file():
        return ""
    export = json.loads(report_file.read_text()).get("export", {})
    if export.get("format") != "gguf":
        return ""
    types = ", ".join(f"{count} {kind}" for kind, count in export["projection_types"].items())
    return (f"written as a GGUF file ({export['gguf_type']}, llama.cpp arch {export['architecture']}; projections: "
            f"{types}): {export['file_bytes'] / 2**20:.1f} MiB, {export['file_bytes'] / export['dense_f16_bytes']:.2f}x "
            f"the dense model's weights in f16 ({export['dense_f16_bytes'] / 2**20:.1f} MiB)"
            + (f"; {export['fallback_projections']} projections in llama.cpp's fallback type because "
               f"{'; '.join(export['fallback_rows'])}"
               if export.get("fallback_projections") else ""))


def _print_out_of_domain(report: dict | None) -> None:
    """The out-of-domain perplexity, fidelity and repetition lines of the prune summary."""
    if not report:
        return
    before, after = report["before"], report["after"]
    if "perplexity" in after:
        dense_ppl, pruned_ppl, fid = before["perplexity"], after["perplexity"], after["fidelity"]
        print(f"out-of-domain perplexity on {pruned_ppl['data']} (validation), {pruned_ppl['n_windows']} windows of "
              f"{pruned_ppl['seq_len']} tokens, {pruned_ppl['n_tokens']} tokens: dense {dense_ppl['ppl']:.3f} -> "
              f"pruned {pruned_ppl['ppl']:.3f} ({pruned_ppl['ppl'] / dense_ppl['ppl']:.2f}x)"
              + (" — not unseen: the run trained or scored on its training split" if report.get("seen_while_pruning")
                 else ""))
        print(f"fidelity to dense on {fid['n_tokens']} of those tokens: KL {fid['kl']:.4f} nats/token, "
              f"top-1 agreement {fid['top1_agreement']:.3f}")
    gen_before, gen_after = before["generation"], after["generation"]
    print(f"repeated 4-grams in greedy {gen_after['new_tokens']}-token continuations of {gen_after['n_prompts']} "
          f"prompts: dense {gen_before['repetition']:.3f} -> pruned {gen_after['repetition']:.3f}")


def _print_decoding(decoding: dict) -> None:
    """The summary line of the repetition penalty the model ships with."""
    penalty = decoding["repetition_penalty"]
    if decoding["measured"]:
        tried = ", ".join(f"{p}: {decoding['tried'][p]:.3f} +{over:.3f}" for p, over in decoding["excess"].items())
        chosen = (f"chosen on {decoding['n_prompts']} fixed prompts, not the ones above (dense: "
                  f"{decoding['dense_repetition']:.3f}; tried, with the excess over dense prompt by prompt: {tried})")
        if not decoding["reached_bar"]:
            chosen += ("; no candidate kept repetition within 0.01 of dense's, prompt by prompt, so the "
                       "strongest is kept: check the samples below, or set --repetition-penalty")
    else:
        chosen = "given by --repetition-penalty"
    health = decoding["generation"]
    shipped = (f"repetition penalty {penalty:g}, written with the model (generation_config.json / GGUF "
               f"general.sampling.penalty_repeat)" if penalty != 1.0 else "no repetition penalty")
    print(f"decoding default: {shipped}, {chosen}"
          + (f"; under it the {health['n_prompts']} prompts' repeated 4-grams: {health['repetition']:.3f}"
             if health else ""))


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `loraprune export`."""
    parser.add_argument("run", metavar="RUN_DIR", help="a finished --out folder or an interrupted run folder")
    parser.add_argument("--out", required=True, help="folder the pruned model is written to")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    add_format_arguments(parser)
    parser.add_argument("--skip-logit-check", action="store_true",
                        help="write the model even if its logits differ from the masked model's beyond float "
                        "rounding (the difference is recorded in loraprune.json)")


def export_command(args: argparse.Namespace) -> int:
    """Merge, slice and write the model of a saved run."""
    from loraprune.job import export_run

    written = export_run(args.run, args.out, overwrite=args.overwrite, check_logits=not args.skip_logit_check,
                         export_format=args.export_format, gguf_type=args.gguf_type)
    print(f"pruned model written to {written}")
    report = json.loads((written / "loraprune.json").read_text())
    if not report.get("finished", True):
        print(f"the run is unfinished: step {report['steps']} of {report['config']['steps']}, so this is the model "
              "as it stood then (loraprune.json says finished: false); `loraprune prune --resume RUN_DIR` trains on")
    print(written_kind(written))
    return 0


def add_info_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `loraprune info`."""
    parser.add_argument("folder", metavar="DIR", help="a Hugging Face checkpoint folder")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def info_command(args: argparse.Namespace) -> int:
    """Print parameters, size, architecture and per-layer widths of a checkpoint folder."""
    from loraprune.info import checkpoint_info, format_info

    info = checkpoint_info(args.folder)
    print(json.dumps(info) if args.json else format_info(info))
    return 0


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `loraprune bench speed`."""
    parser.add_argument("what", choices=["speed"], help="what to measure")
    parser.add_argument("--runtime", default="transformers", choices=["transformers", "llamacpp"],
                        help="transformers: time checkpoint folders in PyTorch; llamacpp: time GGUF files in "
                        "llama.cpp via xllamacpp (default: %(default)s)")
    parser.add_argument("--model", default="smollm2-135m",
                        help="the dense model; with --runtime llamacpp a .gguf file, or a model that is first "
                        "written as a dense GGUF of the pruned files' type (default: %(default)s)")
    parser.add_argument("--pruned", nargs="+", required=True, metavar="PATH",
                        help="pruned checkpoint folders (llamacpp: .gguf files or folders holding model.gguf)")
    parser.add_argument("--prompt-tokens", type=int, default=512, help="prefill length (default: %(default)s)")
    parser.add_argument("--new-tokens", type=int, default=128, help="decoded tokens (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats, median kept (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch / llama.cpp threads (default: torch's choice / all cores)")
    parser.add_argument("--json", action="store_true", help="print the full result as JSON")


def bench_command(args: argparse.Namespace) -> int:
    """Time prefill and decode of the dense and pruned models; print speedups next to the ideal."""
    if args.runtime == "llamacpp":
        from loraprune.evaluation import llamacpp_speed

        result = llamacpp_speed.benchmark_gguf_speed(args.model, args.pruned, args.prompt_tokens, args.new_tokens,
                                                     args.repeats, args.threads)
        print(json.dumps(result) if args.json else llamacpp_speed.speed_table(result))
        return 0
    from loraprune.evaluation.speed import benchmark_speed, speed_table
    from loraprune.models.loading import resolve_model_dir

    result = benchmark_speed(resolve_model_dir(args.model), args.pruned, args.prompt_tokens,
                             args.new_tokens, args.repeats, args.threads)
    print(json.dumps(result) if args.json else speed_table(result))
    return 0


# name -> (help, add_arguments, run). Each new subcommand is one entry and two functions.
COMMANDS: dict[
    str,
    tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]],
] = {
    "eval": ("measure perplexity on a text", add_eval_arguments, eval_command),
    "prune": ("prune a model while fine-tuning LoRA, then export it", add_prune_arguments, prune_command),
    "export": ("write a saved run's pruned model as a standard checkpoint or a GGUF file", add_export_arguments,
               export_command),
    "info": ("describe a checkpoint folder: size, architecture, widths", add_info_arguments, info_command),
    "bench": ("measure prefill and decode speed of pruned vs dense", add_bench_arguments, bench_command),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one subparser per entry of COMMANDS."""
    parser = argparse.ArgumentParser(
        prog="loraprune",
        description="LoRA-guided structured pruning of LLaMA-family models.",
    )
    parser.add_argument("--version", action="version", version=f"loraprune {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        subparser = subparsers.add_parser(name, help=help_text, description=help_text)
        add_arguments(subparser)
        subparser.set_defaults(handler=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the loraprune command line; returns the process exit code."""
    args = build_parser().parse_args(argv)
    # Only a real command line may keep bitsandbytes out: a caller's process may need it later.
    quiet_third_party(needs_bitsandbytes=argv is not None or _may_need_bitsandbytes(args),
                      progress_bars=not getattr(args, "no_progress", False))
    return _run(args)


def _may_need_bitsandbytes(args: argparse.Namespace) -> bool:
    """Whether the command may quantise a base: --base-bits, or a saved run that may have used it."""
    if args.command == "prune":
        return args.base_bits is not None or bool(args.resume)
    return args.command == "export"


def _run(args: argparse.Namespace) -> int:
    """Run a parsed command, turning user errors into one line on stderr and exit code 2."""
    try:
        return args.handler(args)
    except LoraPruneError as e:
        print(f"loraprune: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("loraprune: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except RuntimeError as e:  # torch.distributed's errors are RuntimeErrors
        world_size = _distributed_world_size()
        if world_size < 2 or not lost_another_process(e):
            raise
        print(f"loraprune: error: another process of this {world_size}-process job died ({first_line(e)})"
              f"{_resume_hint(args, world_size)}", file=sys.stderr)
        _exit_without_teardown(EXIT_PEER_LOST)


def _exit_without_teardown(code: int) -> NoReturn:
    """Exit at once: tearing down a process group whose peer is gone can abort the interpreter's exit in gloo's
    threads ("terminate called without an active exception", SIGABRT) after the one line was printed; the run's
    checkpoint is already on disk, so there is nothing left to save."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# What gloo and NCCL say when a peer process is gone (killed, crashed or out of memory).
LOST_PEER_SIGNS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator",
                   "Socket Timeout", "recvBytes", "sendBytes")


def lost_another_process(error: RuntimeError) -> bool:
    """Whether ``error`` is torch.distributed reporting that another process of the job is gone."""
    from torch.distributed import DistError

    return isinstance(error, DistError) or any(sign in str(error) for sign in LOST_PEER_SIGNS)


def _distributed_world_size() -> int:
    distributed = sys.modules.get("torch.distributed")
    if distributed is None or not distributed.is_available() or not distributed.is_initialized():
        return 1
    return distributed.get_world_size()


def _resume_hint(args: argparse.Namespace, world_size: int) -> str:
    """'; resume with: ...' for a prune whose run folder is known, else nothing."""
    if args.command != "prune" or not (args.resume or args.out):
        return ""
    from loraprune.training.run_folder import PARTIAL_SUFFIX, partial_dir

    run = Path(args.resume if isinstance(args.resume, str) else args.out)
    run_dir = run if run.name.endswith(PARTIAL_SUFFIX) else partial_dir(run)
    return f"; resume with: torchrun --nproc_per_node={world_size} -m loraprune prune --resume {run_dir}"
