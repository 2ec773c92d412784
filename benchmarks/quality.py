"""Perplexity after pruning SmolLM2 with each method, at the same sparsity, seed, data and steps.

Methods (METHODS below): the paper's lora criterion, the mask-gradient fisher criterion with and
without self-distillation, the vanilla grad criterion, an LLM-Pruner-style one-shot baseline with
LoRA recovery (with and without distillation), magnitude, random; plus dense, dense + the same LoRA
fine-tuning, and dense + LoRA + distillation. Results are saved after every run, so an interrupted
suite resumes where it stopped.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from loraprune.config import PruneConfig, calibration_sources
from loraprune.data import load_text, token_blocks
from loraprune.data.blocks import corpus_ids
from loraprune.data.corpora import load_corpus
from loraprune.data.generated import (
    SELF,
    GeneratedText,
    generate_text,
    parse_data,
    scoring_block_count,
    scoring_text,
    self_block_count,
)
from loraprune.evaluation.fidelity import dense_view, fidelity
from loraprune.evaluation.generation import generation_health
from loraprune.evaluation.perplexity import perplexity
from loraprune.export import ExportRequest, export_model
from loraprune.models import count_parameters, projection_biases, spec_for
from loraprune.models.loading import load_model
from loraprune.pruning.groups import LayerShape
from loraprune.pruning.masks import ModelMasks, removed_parameters
from loraprune.pruning.schedule import PruningSchedule
from loraprune.pruning.target import solve_model_target
from loraprune.training.oneshot import one_shot_masks
from loraprune.training.recipe import train_while_pruning

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_sections import RESULTS, machine_line, write_section

# The pruned models of DEFAULT_METHOD are exported here for the speed benchmark (not committed).
EXPORTS = Path(__file__).resolve().parent.parent / "runs" / "benchmarks"
# Text the dense model sampled, kept so every run with the same seed and budget trains on the same samples.
SELF_TEXT = EXPORTS / "self-text"


@dataclass(frozen=True)
class Method:
    """How one row of the table is made: run settings, and whether masks come first (one-shot)."""

    settings: dict = field(default_factory=dict)  # PruneConfig fields
    pruned: bool = True  # False: fine-tune with full masks
    one_shot: bool = False  # score once on calibration blocks, then only recover
    trained: bool = True  # False: the dense model as it is
    recovered: bool = True  # False (one-shot): evaluate the pruned model as it is, no LoRA training
    data: str = "austen"  # --data: Austen alone, Austen alternating with the dense model's samples, or samples only

    @property
    def scored_on_pydoc(self) -> bool:
        """Its units were scored on pydoc's training split, so pydoc is no longer unseen text for it."""
        return "pydoc" in calibration_sources(self.settings.get("calibration") or "")


# LLM-Pruner's element-wise first-order criterion as published: |∇W ⊙ W| summed over each group,
# no per-matrix normalisation (its "param_first" Taylor importance with sum reduction).
LLM_PRUNER = {"criterion": "grad", "score_power": "abs", "normalise_scores": False}
# FLAP as published: fluctuation metric, standardised across layers, global allocation, bias
# compensation from the calibration tokens' means; no training at all (flap+lora: LoRA recovery after).
FLAP = {"criterion": "flap", "allocation": "global", "bias_compensation": True}
# Half cross-entropy, half KL. (Pure KL, "+kl", has zero gradient while nothing is pruned: the
# fisher criterion then scores cross-entropy on tokens sampled from the teacher instead.)
DISTILL = {"distill": 0.5}
EARLY = {"warmup_fraction": 0.0, "cooldown_fraction": 2 / 3}  # ramp over the first third, then recover
# The ramp every row runs unless its name says otherwise (/cool:F): from 10 % to 90 % of the steps, the
# paper's placement and prune's default until the /cool: rows moved it. Pinned, so the rows stay comparable.
SUITE_SCHEDULE = {"warmup_fraction": 0.1, "cooldown_fraction": 0.1}


def lora_rank(rank: int) -> dict:
    """LoRA rank R with alpha 2R: the adapter's scale stays the default's 2 (rows /rank:R)."""
    return {"lora_rank": rank, "lora_alpha": 2 * rank}


METHODS: dict[str, Method] = {
    "dense": Method(pruned=False, trained=False),
    "dense+lora": Method(pruned=False),
    "dense+lora+distill": Method(DISTILL, pruned=False),
    "lora": Method({"criterion": "lora"}),
    "lora-rows": Method({"criterion": "lora", "lora_columns": False}),
    "grad": Method({"criterion": "grad"}),
    "fisher": Method({"criterion": "fisher"}),
    "fisher+distill": Method({"criterion": "fisher", **DISTILL}),
    "fisher+distill1.0": Method({"criterion": "fisher", "distill": 1.0}),
    "fisher+early": Method({"criterion": "fisher", **EARLY}),
    "fisher+distill+early": Method({"criterion": "fisher", **DISTILL, **EARLY}),
    "fisher+global": Method({"criterion": "fisher", "allocation": "global"}),
    "fisher+global+distill": Method({"criterion": "fisher", "allocation": "global", **DISTILL}),
    "fisher+global+kl": Method({"criterion": "fisher", "allocation": "global", "distill": 1.0}),
    "fisher+global+bias": Method({"criterion": "fisher", "allocation": "global", "bias_compensation": True}),
    "fisher+global+kl+bias": Method({"criterion": "fisher", "allocation": "global", "distill": 1.0,
                                     "bias_compensation": True}),
    "flap": Method(FLAP, one_shot=True, recovered=False),
    "flap+lora": Method(FLAP, one_shot=True),
    # Recovery text (the run key says it after "@"): "self" is sampled by the dense model (see SELF_TEXT).
    "fisher+global@austen+self": Method({"criterion": "fisher", "allocation": "global"}, data="austen+self"),
    "fisher+global+distill@austen+self": Method({"criterion": "fisher", "allocation": "global", **DISTILL},
                                                data="austen+self"),
    "fisher+global+distill@self": Method({"criterion": "fisher", "allocation": "global", **DISTILL}, data="self"),
    # Scored on another text than the recovery text (--calibration); "pydoc" puts the out-of-domain
    # text's training split in the scoring text, so those rows are no longer judged on unseen text.
    "fisher+global/cal:austen+pydoc": Method({"criterion": "fisher", "allocation": "global",
                                              "calibration": "austen+pydoc"}),
    "fisher+global/cal:pydoc": Method({"criterion": "fisher", "allocation": "global", "calibration": "pydoc"}),
    # "self": text the dense model samples from BOS (prune --calibration self); pydoc stays unseen.
    **{f"fisher+global/cal:{text}{at}": Method({"criterion": "fisher", "allocation": "global", "calibration": text,
                                                **lr})
       for text in ("self", "austen+self") for at, lr in (("", {}), ("/lr:8e-4", {"lr": 8e-4}),
                                                           ("/lr:1.6e-3", {"lr": 1.6e-3}))},
    # The paper's λ = 0.9 (--ema) averages about ten steps: with one 128-token block a step, few tokens
    # to score on; a slower average has more of them, a faster one follows the pruned model sooner.
    **{f"fisher+global{cal}/lr:8e-4/ema:{ema}": Method({"criterion": "fisher", "allocation": "global", "lr": 8e-4,
                                                       "ema": float(ema), **calibration})
       for cal, calibration, ema in (("", {}, "0.7"), ("", {}, "0.99"), ("/cal:self", {"calibration": "self"}, "0.99"))},
    # Scored on self every other step of the ramp (--calibration-every 2): half the extra pass and half the samples.
    "fisher+global/cal:self/lr:8e-4/every:2": Method({"criterion": "fisher", "allocation": "global", "lr": 8e-4,
                                                      "calibration": "self", "calibration_every": 2}),
    # Squared mask gradients of 16-token windows (--fisher-window 16) instead of whole 128-token sequences.
    **{f"fisher+global{cal}/lr:8e-4/window:{window}": Method({"criterion": "fisher", "allocation": "global",
                                                             "lr": 8e-4, "fisher_window": window, **calibration})
       for cal, calibration in (("", {}), ("/cal:self", {"calibration": "self"})) for window in (1, 16)},
    # No layer loses more than this share of its parameters (--max-layer-sparsity); 20 % of the whole model is
    # about 25 % of each layer's on average, 50 % about 64 %. Only its own sparsity makes sense for each row.
    **{f"fisher+global{cal}/lr:8e-4/cap:{cap}": Method({"criterion": "fisher", "allocation": "global", "lr": 8e-4,
                                                       "max_layer_sparsity": float(cap), **calibration})
       for cal, calibration in (("", {}), ("/cal:self", {"calibration": "self"})) for cap in ("0.3", "0.35", "0.4", "0.8")},
    # More adapter capacity for the same 128 steps (--lora-rank R, alpha 2R so LoRA's scale stays 2).
    **{f"fisher+global{cal}/lr:8e-4/rank:{rank}": Method({"criterion": "fisher", "allocation": "global", "lr": 8e-4,
                                                         **lora_rank(rank), **calibration})
       for cal, calibration in (("", {}), ("/cal:self", {"calibration": "self"})) for rank in (32, 64)},
    # ½ distillation (+distill) or KL alone (+kl) on a run scored on the model's own text, at rank 8 or 32.
    **{f"fisher+global+{loss}/cal:self/lr:{lr}{at}": Method({"criterion": "fisher", "allocation": "global",
                                                             "lr": float(lr), "calibration": "self", **distill,
                                                             **lora})
       for loss, distill in (("distill", DISTILL), ("kl", {"distill": 1.0})) for lr in ("8e-4", "1.6e-3")
       for at, lora in (("", {}), ("/rank:32", lora_rank(32)))},
    # The ramp ends at half time (--cooldown 0.5) instead of at nine tenths: five times the steps of recovery
    # with the final masks, and half the ramp's extra scoring pass on the model's own text.
    **{f"fisher+global{loss}{cal}/lr:{lr}{at}/cool:{cool}": Method({"criterion": "fisher", "allocation": "global",
                                                                  "lr": float(lr), "cooldown_fraction": float(cool),
                                                                  **calibration, **distill, **lora})
       for loss, distill, cal, calibration, lr, at, lora in (
           ("", {}, "", {}, "8e-4", "", {}), ("", {}, "/cal:self", {"calibration": "self"}, "8e-4", "", {}),
           ("+distill", DISTILL, "/cal:self", {"calibration": "self"}, "8e-4", "/rank:32", lora_rank(32)),
           ("+kl", {"distill": 1.0}, "/cal:self", {"calibration": "self"}, "1.6e-3", "/rank:32", lora_rank(32)))
       for cool in ("0.3", "0.5", "0.7")},
    # The same run at another learning rate than the suite's (Settings.lr): what chose prune's --lr default.
    **{f"fisher+global/lr:{lr}": Method({"criterion": "fisher", "allocation": "global", "lr": float(lr)})
       for lr in ("1e-4", "4e-4", "8e-4", "1.6e-3", "3.2e-3")},
    "llm-pruner": Method(LLM_PRUNER, one_shot=True),
    "llm-pruner+distill": Method({**LLM_PRUNER, **DISTILL}, one_shot=True),
    "llm-pruner+global": Method({**LLM_PRUNER, "allocation": "global"}, one_shot=True),
    "magnitude": Method({"criterion": "magnitude"}),
    "random": Method({"criterion": "random"}),
}
DEFAULT_METHOD = "fisher"  # what PruneConfig() runs
WIDTHS_PLOTTED = (DEFAULT_METHOD, "fisher+global")  # uniform against global allocation, layer by layer


@dataclass(frozen=True)
class Settings:
    """One suite's budget; every method gets exactly this."""

    sparsities: tuple[float, ...] = (0.2, 0.5)
    steps: int = 128
    seq_len: int = 128
    lr: float = 2e-4
    prune_every: int = 10
    calibration_blocks: int = 10
    eval_tokens: int = 8192
    eval_seq_len: int = 512
    fidelity_tokens: int = 4096  # out-of-domain text the dense and pruned logits are compared on
    generation_tokens: int = 64  # greedy continuation length of each generation-health prompt
    seed: int = 0
    # Runs in this order (the most telling first, so a partial suite already decides the default; a
    # second process --from-the-end starts with the second seeds);
    # (method, sparsity, seed); sparsity None stands for every one of ``sparsities``.
    plan: tuple[tuple[str, float | None, int], ...] = (
        ("dense", 0.0, 0), ("fisher+global", 0.2, 0), ("fisher+global+distill", 0.2, 0), ("fisher+global+kl", 0.2, 0),
        ("fisher+global", 0.5, 0), ("fisher+global@austen+self", 0.2, 0), ("fisher+global+distill@austen+self", 0.2, 0),
        ("fisher+global+distill@self", 0.2, 0), ("fisher+global@austen+self", 0.5, 0), ("fisher+global+distill", 0.5, 0),
        ("llm-pruner+global", 0.2, 0), ("fisher+global+kl", 0.5, 0), ("llm-pruner+global", 0.5, 0),
        ("flap", None, 0), ("fisher+global+bias", 0.2, 0), ("fisher+global+kl+bias", 0.2, 0), ("flap+lora", 0.2, 0),
        ("fisher+global+bias", 0.5, 0), ("fisher+global/cal:austen+pydoc", 0.2, 0),
        ("fisher+global/cal:austen+pydoc", 0.5, 0), ("fisher+global/cal:pydoc", 0.2, 0),
        ("fisher+global/lr:4e-4", None, 0), ("fisher+global/lr:1e-4", None, 0), ("fisher+global/lr:8e-4", None, 0),
        ("fisher+global/lr:1.6e-3", None, 0), ("fisher+global/lr:3.2e-3", None, 0),
        ("fisher+global/cal:self/lr:8e-4", None, 0), ("fisher+global/cal:self", None, 0),
        ("fisher+global/cal:austen+self/lr:8e-4", 0.2, 0), ("fisher+global/cal:self/lr:1.6e-3", None, 0),
        ("fisher+global/cal:self/lr:8e-4/ema:0.99", None, 0), ("fisher+global/lr:8e-4/ema:0.99", None, 0),
        ("fisher+global/lr:8e-4/ema:0.7", None, 0),
        ("fisher+global/cal:self/lr:8e-4/every:2", None, 0),
        ("fisher+global/lr:8e-4/window:16", None, 0), ("fisher+global/lr:8e-4/cap:0.4", 0.2, 0),
        ("fisher+global/lr:8e-4/cap:0.8", 0.5, 0), ("fisher+global/lr:8e-4/window:1", None, 0),
        ("fisher+global/cal:self/lr:8e-4/window:16", None, 0), ("fisher+global/cal:self/lr:8e-4/cap:0.4", 0.2, 0),
        ("fisher+global/cal:self/lr:8e-4/cap:0.8", 0.5, 0), ("fisher+global/lr:8e-4/cap:0.35", 0.2, 0),
        ("fisher+global/cal:self/lr:8e-4/cap:0.35", 0.2, 0), ("fisher+global/lr:8e-4/cap:0.3", 0.2, 0),
        ("fisher+global/cal:self/lr:8e-4/cap:0.3", 0.2, 0),
        # A second seed of the two leading runs: how far a row moves by chance alone.
        ("fisher+global/lr:8e-4", None, 1), ("fisher+global/cal:self/lr:8e-4", None, 1),
        ("fisher+global/cal:self/lr:8e-4/rank:32", None, 0), ("fisher+global/lr:8e-4/rank:32", None, 0),
        ("fisher+global+distill/cal:self/lr:8e-4", None, 0),
        ("fisher+global/cal:self/lr:8e-4/rank:32", 0.5, 1), ("fisher+global/cal:self/lr:8e-4/rank:64", 0.5, 0),
        ("fisher+global/lr:8e-4/rank:32", None, 1), ("fisher+global+distill/cal:self/lr:8e-4/rank:32", None, 0),
        ("fisher+global+distill/cal:self/lr:8e-4/rank:32", None, 1), ("fisher+global+kl/cal:self/lr:8e-4/rank:32", 0.5, 0),
        ("fisher+global+kl/cal:self/lr:8e-4/rank:32", 0.5, 1), ("fisher+global+kl/cal:self/lr:8e-4/rank:32", 0.2, 0),
        ("fisher+global+kl/cal:self/lr:1.6e-3/rank:32", 0.5, 0), ("fisher+global+kl/cal:self/lr:1.6e-3/rank:32", 0.5, 1),
        ("fisher+global/cal:self/lr:8e-4/cool:0.5", 0.2, 0), ("fisher+global+distill/cal:self/lr:8e-4/rank:32/cool:0.5", 0.2, 0),
        ("fisher+global+distill/cal:self/lr:1.6e-3/rank:32", 0.2, 0),
        ("fisher+global+kl/cal:self/lr:1.6e-3/rank:32/cool:0.5", 0.5, 0),
        ("fisher+global/cal:self/lr:8e-4/cool:0.5", 0.5, 0), ("fisher+global/lr:8e-4/cool:0.5", None, 0),
        ("fisher+global+kl/cal:self/lr:1.6e-3/rank:32/cool:0.5", 0.5, 1), ("fisher+global/lr:8e-4/cool:0.7", None, 0),
        ("fisher+global/lr:8e-4/cool:0.3", None, 0), ("fisher+global+distill/cal:self/lr:8e-4/rank:32/cool:0.7", 0.2, 0),
        ("fisher+global/lr:8e-4/cool:0.5", None, 1), ("fisher+global/cal:self/lr:8e-4/cool:0.5", None, 1),
        ("fisher+global+kl/cal:self/lr:1.6e-3/rank:32/cool:0.5", 0.5, 2),
        ("fisher+global+distill/cal:self/lr:8e-4/rank:32/cool:0.5", 0.2, 1),
    )


BUDGET_STEPS = (128, 512, 2048)  # the budget curve: the default method after each many steps
BUDGET_PLAN = (("dense", 0.0, 0), ("fisher+global", 0.2, 0), ("fisher+global", 0.5, 0),
               ("fisher+global/cal:austen+pydoc", 0.2, 0), ("fisher+global/cal:austen+pydoc", 0.5, 0),
               ("fisher+global/cal:self", 0.2, 0), ("fisher+global/cal:self", 0.5, 0))
# The budget table's rows, per steps.
BUDGET_METHODS = ("fisher+global", "fisher+global/cal:austen+pydoc", "fisher+global/cal:self")
# The smoke run takes each path through run_one once (not every row: CI's budget): the dense model as it is,
# unpruned training with distillation, the default (pruning while training) and a one-shot baseline. The
# criteria and losses themselves are tested in tests/; every method's settings are checked as a PruneConfig
# by a fast test.
QUICK_METHODS = ("dense", "dense+lora+distill", DEFAULT_METHOD, "llm-pruner+global")
QUICK = Settings(steps=6, seq_len=64, prune_every=1, calibration_blocks=2, eval_tokens=512, eval_seq_len=256,
                 fidelity_tokens=256, generation_tokens=8, sparsities=(0.3,),
                 plan=tuple((name, None if METHODS[name].pruned else 0.0, 0) for name in QUICK_METHODS))


def run_key(method: str, sparsity: float, seed: int) -> str:
    """The name of one run in the results file."""
    return f"{method}@{sparsity}" + (f"#seed{seed}" if seed else "")


def _config(settings: Settings, method: Method, sparsity: float, seed: int) -> PruneConfig:
    suite = {"data": method.data, "sparsity": sparsity or 0.5, "steps": settings.steps, "seq_len": settings.seq_len,
             "lr": settings.lr, "prune_every": settings.prune_every, "seed": seed, "save_every": 10 ** 9,
             **SUITE_SCHEDULE}
    return PruneConfig(**suite).with_overrides(method.settings)  # a method may set its own learning rate


def _calibration(train_blocks: torch.Tensor, settings: Settings, seed: int) -> torch.Tensor:
    """Random training blocks, as LLM-Pruner samples its calibration sequences."""
    order = torch.randperm(len(train_blocks), generator=torch.Generator().manual_seed(seed))
    return train_blocks[order[: settings.calibration_blocks]]


def self_text(base, tokenizer, settings: Settings, data: str, seed: int) -> torch.Tensor:
    """The blocks ``prune --data DATA`` would sample from the dense model, generated once and cached.

    The same code as the CLI's (loraprune.data.generated): a chat-turn opening, plus 8 tokens of
    Austen's training text when mixed, then temperature-1 samples up to one block.
    """
    spec = parse_data(data)
    count = self_block_count(settings.steps, 1, spec.corpus is not None, None, settings.seq_len)
    prompts = spec.corpus or "chat-turn"
    folder = SELF_TEXT / f"{prompts}-prompts-seed{seed}-len{settings.seq_len}-blocks{count}"
    cached = GeneratedText.load(folder)
    if cached is None:
        user_ids = corpus_ids(tokenizer, load_corpus(spec.corpus, "train")) if spec.corpus else None
        cached = generate_text(base, tokenizer, count, 0, settings.seq_len, seed, user_ids)
        folder.mkdir(parents=True, exist_ok=True)
        cached.save(folder)
    return cached.train


def recovery_blocks(base, tokenizer, settings: Settings, method: Method, seed: int,
                    austen_blocks: torch.Tensor) -> list[torch.Tensor]:
    """The training sources of one method, alternating sample by sample as in ``prune``: Austen first."""
    spec = parse_data(method.data)
    sources = [austen_blocks] if spec.corpus == "austen" else []
    if spec.corpus not in (None, "austen"):
        raise ValueError(f"the suite trains on Austen or self-generated text, not {method.data!r}")
    if spec.with_self:
        sources.append(self_text(base, tokenizer, settings, method.data, seed))
    return sources


def calibration_blocks(config: PruneConfig, base, tokenizer) -> list[torch.Tensor] | None:
    """The --calibration text's training blocks, as ``prune`` makes them; None scores on the recovery text."""
    if config.calibration is None:
        return None
    return [scoring_samples(config, base, tokenizer) if name == SELF
            else token_blocks(tokenizer, load_text(name, "train"), config.seq_len)
            for name in calibration_sources(config.calibration)]


def scoring_samples(config: PruneConfig, base, tokenizer) -> torch.Tensor:
    """``--calibration self``: the blocks ``prune`` samples from BOS, one per scored step, generated once and cached."""
    scored_steps = PruningSchedule.for_config(config).scored_steps(every=config.calibration_every)
    count = scoring_block_count(scored_steps, config.batch_size * config.grad_accumulation)  # one process
    folder = SELF_TEXT / f"bos-prompts-seed{config.seed}-len{config.seq_len}-blocks{count}"
    cached = GeneratedText.load(folder)
    if cached is None:
        blocks = scoring_text(base, tokenizer, count, config.seq_len, config.seed)
        cached = GeneratedText(blocks, blocks[:0])
        folder.mkdir(parents=True, exist_ok=True)
        cached.save(folder)
    return cached.train


def run_one(base, name: str, sparsity: float, seed: int, settings: Settings, train_blocks: torch.Tensor,
            eval_sets: dict[str, torch.Tensor], export_to: Path | None = None, tokenizer=None) -> dict:
    """Prune (or fine-tune) a copy of ``base`` with one method, measure it, optionally export it."""
    method = METHODS[name]
    sources = recovery_blocks(base, tokenizer, settings, method, seed, train_blocks) if method.trained else []
    model = copy.deepcopy(base)
    total = count_parameters(model)
    started = time.perf_counter()
    achieved, steps, outcome, log = 0.0, 0, None, []
    if method.trained:
        config = _config(settings, method, sparsity, seed)
        fixed = None
        if not method.pruned:
            fixed = ModelMasks.for_model(model)
        elif method.one_shot:
            calibration = _calibration(train_blocks, settings, seed)
            fixed = one_shot_masks(model, calibration, config, solve_model_target(model, config))
        if method.recovered:
            with tempfile.TemporaryDirectory() as run_dir:
                outcome = train_while_pruning(model, sources, config, Path(run_dir), progress=True,
                                              fixed_masks=fixed,
                                              calibration_blocks=calibration_blocks(config, base, tokenizer))
                log = [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()]
            model, achieved, steps = outcome.model, outcome.achieved_sparsity, outcome.steps
        else:
            fixed.attach(model, spec_for(model.config))
            outcome = OneShotOutcome(fixed)
            achieved = removed_parameters(fixed, LayerShape.from_config(model.config),
                                          *projection_biases(model, spec_for(model.config))) / total
    seconds = time.perf_counter() - started
    model.eval()
    row = {"method": name, "target_sparsity": sparsity, "seed": seed, "achieved_sparsity": achieved,
           "parameters": round(total * (1 - achieved)), "steps": steps, "wall_seconds": seconds,
           "settings": method.settings, "data": method.data, "loss_curve": [round(entry["loss"], 4) for entry in log]}
    if outcome is not None:
        row["kept_per_layer"] = outcome.masks.kept_counts()
    for text, blocks in eval_sets.items():
        row[f"ppl_{text}"] = perplexity(model, blocks, progress=False).ppl
    view = dense_view(model, outcome.masks if outcome is not None else None)
    row["fidelity_pydoc"] = fidelity(model, eval_sets["pydoc"][: settings.fidelity_tokens // settings.eval_seq_len],
                                     view).to_dict()
    row["generation"] = generation_health(model, tokenizer, settings.generation_tokens).to_dict()
    if export_to is not None and outcome is not None:
        report = {"source_model": "smollm2-135m", "criterion": name, "data": method.data, "steps": steps,
                  "seed": seed, "target_sparsity": sparsity, "achieved_sparsity": achieved,
                  "written_by": "benchmarks/quality.py"}
        export_model(ExportRequest(model, outcome.masks, tokenizer, report, export_to, overwrite=True))
        row["exported_to"] = str(export_to)
    return row


@dataclass
class OneShotOutcome:
    """What a run without recovery training leaves: the masks (attached to the model)."""

    masks: ModelMasks


def _budget(settings: Settings) -> dict:
    """What every run shares (the plan may grow or be reordered without invalidating results)."""
    return json.loads(json.dumps({k: v for k, v in asdict(settings).items() if k != "plan"}))


def expanded_plan(settings: Settings) -> list[tuple[str, float, int]]:
    """(method, sparsity, seed) of every run, in the plan's order."""
    runs = []
    for name, sparsity, seed in settings.plan:
        for s in (settings.sparsities if sparsity is None else (sparsity,)):
            runs.append((name, s, seed))
    return runs


def _recorded_runs(settings: Settings, results_path: Path) -> dict:
    """Runs already in the results file with this budget (another process may be adding to it)."""
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    return results["runs"] if results.get("settings") == _budget(settings) else {}


def run_suite(settings: Settings, results_path: Path, from_the_end: bool = False,
              only: set[str] | None = None) -> dict:
    """Run the plan, skipping runs already recorded with the same budget.

    ``only``: run just these methods' rows, or these run keys, of the plan. Two processes can share one
    results file, one of them ``from_the_end``: each re-reads the file before a run and merges into it
    after one, so neither repeats nor erases the other's runs.
    """
    results = {"settings": _budget(settings), "runs": _recorded_runs(settings, results_path)}
    base, tokenizer = load_model("smollm2-135m")
    train_blocks = token_blocks(tokenizer, load_text("austen", "train"), settings.seq_len)
    eval_sets = {
        "austen": token_blocks(tokenizer, load_text("austen", "validation"), settings.eval_seq_len,
                               settings.eval_tokens),
        "pydoc": token_blocks(tokenizer, load_text("pydoc", "validation"), settings.eval_seq_len,
                              settings.eval_tokens),
    }
    results["eval"] = {name: {"windows": int(b.shape[0]), "seq_len": int(b.shape[1]),
                              "tokens": int(b.numel())} for name, b in eval_sets.items()}
    plan = [run for run in expanded_plan(settings) if not only or run[0] in only or run_key(*run) in only]
    for name, sparsity, seed in reversed(plan) if from_the_end else plan:
        key = run_key(name, sparsity, seed)
        if key in _recorded_runs(settings, results_path) or key in results["runs"]:
            continue
        print(f"--- {key}", flush=True)
        exported = name == DEFAULT_METHOD and seed == settings.seed and settings != QUICK
        export_to = EXPORTS / f"{name}-{sparsity}" if exported else None
        row = run_one(base, name, sparsity, seed, settings, train_blocks, eval_sets, export_to, tokenizer)
        print(json.dumps({k: v for k, v in row.items() if k not in ("kept_per_layer", "loss_curve")}), flush=True)
        results["runs"] = {**_recorded_runs(settings, results_path), **results["runs"], key: row}
        results["machine"] = machine_line()
        results_path.parent.mkdir(parents=True, exist_ok=True)
        partial = results_path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(results, indent=1) + "\n")
        partial.replace(results_path)
    return results


def _rows(results: dict) -> list[dict]:
    order = {m: i for i, m in enumerate(METHODS)}
    return sorted(results["runs"].values(), key=lambda r: (r["target_sparsity"], order[r["method"]], r["seed"]))


def _mean_over_seeds(rows: list[dict], method: str, sparsity: float) -> tuple[float, float, int] | None:
    """(mean, half the spread, seeds) of Northanger Abbey perplexity for one method and sparsity."""
    values = [r["ppl_austen"] for r in rows if r["method"] == method and r["target_sparsity"] == sparsity]
    if not values:
        return None
    return sum(values) / len(values), (max(values) - min(values)) / 2, len(values)


# The issue's targets: (Northanger Abbey, pydoc) perplexity ratios to dense at each sparsity.
TARGETS = {0.2: (1.25, 1.6), 0.5: (3.0, 8.0)}


def ratios_to_dense(row: dict, dense: dict) -> tuple[float, float, float]:
    """(in-domain ratio, out-of-domain ratio, their geometric mean: the selection measure)."""
    inside, outside = row["ppl_austen"] / dense["ppl_austen"], row["ppl_pydoc"] / dense["ppl_pydoc"]
    return inside, outside, (inside * outside) ** 0.5


def selection_key(row: dict, dense: dict) -> tuple[float, float]:
    """Lower is better: the geometric mean of the two ratios, then the repetition score."""
    return ratios_to_dense(row, dense)[2], row.get("generation", {}).get("repetition", 1.0)


def _dense_row(rows: list[dict]) -> dict | None:
    return next((r for r in rows if r["method"] == "dense"), None)


def summary_lines(results: dict) -> list[str]:
    """Per sparsity: the method the selection measure picks, the targets met or missed by how much."""
    rows = [r for r in _rows(results) if r["seed"] == results["settings"]["seed"]]
    dense = _dense_row(rows)
    if dense is None:
        return []
    lines = [(f"- Dense: Northanger Abbey {dense['ppl_austen']:.2f}, pydoc {dense['ppl_pydoc']:.2f}, "
             f"repetition {dense['generation']['repetition']:.3f}.")]
    for sparsity in results["settings"]["sparsities"]:
        every_pruned = [r for r in rows if r["target_sparsity"] == sparsity and METHODS[r["method"]].pruned]
        pruned = [r for r in every_pruned if not METHODS[r["method"]].scored_on_pydoc]
        if not pruned:
            continue
        best = min(pruned, key=lambda r: selection_key(r, dense))
        inside, outside, geo = ratios_to_dense(best, dense)
        line = (f"- At {sparsity}: the selection measure picks `{best['method']}`: Northanger Abbey {inside:.2f}× "
                f"dense, pydoc {outside:.2f}× (geometric mean {geo:.2f}), repetition "
                f"{best['generation']['repetition']:.3f} (dense {dense['generation']['repetition']:.3f})")
        others = sorted((r for r in pruned if r is not best), key=lambda r: selection_key(r, dense))
        if others:
            runner = others[0]
            line += f"; next `{runner['method']}` at {ratios_to_dense(runner, dense)[2]:.2f}"
        lines.append(line + ".")
        if sparsity in TARGETS:
            lines.append("  " + _target_verdict(inside, outside, TARGETS[sparsity]))
        lines += _recovery_text_lines(pruned, dense)
        lines += _calibration_lines(every_pruned, dense, TARGETS.get(sparsity))
        lines += _setting_lines(pruned, dense, results["settings"].get("lr", Settings().lr))
        lines += _seed_lines(results, sparsity, dense)
    return lines


def _setting_lines(pruned: list[dict], dense: dict, suite_lr: float) -> list[str]:
    """Each run named METHOD/SETTING:X beside METHOD, which runs that setting at the suite's value or the default."""
    lines, suite = [], f"{suite_lr:.0e}".replace("e-0", "e-")  # 2e-4, as the rows' names spell rates
    for separator, setting, against in (("/lr:", "lr", f"lr {{}} against {suite}"),
                                        ("/ema:", "ema", "Scores averaged with λ = {} against 0.9"),
                                        ("/every:", "calibration_every",
                                         "The calibration text scored every {} steps against every step"),
                                        ("/window:", "fisher_window",
                                         "Mask gradients squared per {}-token window against per 128-token sequence"),
                                        ("/cap:", "max_layer_sparsity",
                                         "No layer losing more than {} of its parameters against no cap"),
                                        ("/rank:", "lora_rank", "LoRA rank {} against 8"),
                                        ("/cool:", "cooldown_fraction",
                                         ("Masks final for the last {} of the steps against the last "
                                          f"{SUITE_SCHEDULE['cooldown_fraction']}"))):
        is_twin = lambda r, setting=setting: setting not in METHODS[r["method"]].settings
        for row, twin, value, method in _beside_twins(pruned, separator, is_twin):
            (inside, outside, geo), (twin_in, twin_out, twin_geo) = ratios_to_dense(row, dense), ratios_to_dense(twin, dense)
            lines.append(f"  - {against.format(value)} for `{method}`: geometric mean {geo:.2f} against "
                         f"{twin_geo:.2f} ({geo / twin_geo - 1:+.1%}); Northanger Abbey {inside:.2f}× against "
                         f"{twin_in:.2f}×, pydoc {outside:.2f}× against {twin_out:.2f}×, repetition "
                         f"{row['generation']['repetition']:.3f} against {twin['generation']['repetition']:.3f}.")
    return lines


def _seed_lines(results: dict, sparsity: float, dense: dict) -> list[str]:
    """Each method run with more than one seed: how far chance alone moved its ratios."""
    by_method: dict[str, list[dict]] = {}
    for row in _rows(results):
        if row["target_sparsity"] == sparsity and METHODS[row["method"]].pruned:
            by_method.setdefault(row["method"], []).append(row)
    lines = []
    for method, rows in by_method.items():
        if len(rows) < 2:
            continue
        inside, outside, geos = zip(*(ratios_to_dense(row, dense) for row in rows))
        spell = lambda values: ", ".join(f"{value:.2f}" for value in values)
        lines.append(f"  - `{method}` with seeds {', '.join(str(row['seed']) for row in rows)} (data order, LoRA "
                     f"init, calibration samples): Northanger Abbey {spell(inside)}×, pydoc {spell(outside)}×, "
                     f"geometric mean {spell(geos)}: chance alone moved the geometric mean by "
                     f"{max(geos) / min(geos) - 1:.1%}.")
    return lines


def _calibration_lines(pruned: list[dict], dense: dict, target: tuple[float, float] | None) -> list[str]:
    """Each run scored on a --calibration text beside the same method scored on its recovery text."""
    lines = []
    scored_on_data = lambda r: "calibration" not in METHODS[r["method"]].settings
    for row, twin, calibration, method in _beside_twins(pruned, "/cal:", scored_on_data):
        (inside, outside, geo), (twin_in, twin_out, twin_geo) = ratios_to_dense(row, dense), ratios_to_dense(twin, dense)
        line = (f"  - Scored on `{calibration}` (`--calibration`), recovered on Austen, against `{method}`: Northanger "
                f"Abbey {inside:.2f}× against {twin_in:.2f}×, pydoc {outside:.2f}× against {twin_out:.2f}× (geometric "
                f"mean {geo:.2f} against {twin_geo:.2f}), repetition {row['generation']['repetition']:.3f} against "
                f"{twin['generation']['repetition']:.3f}.")
        if METHODS[row["method"]].scored_on_pydoc:
            line += " Not a candidate for the default: its units were scored on pydoc's training split."
            if target is not None:
                line += " " + _target_verdict(inside, outside, target).replace("Targets", "Against the targets")
        lines.append(line)
    return lines


def _recovery_text_lines(pruned: list[dict], dense: dict) -> list[str]:
    """Each run on other recovery text beside the same method on Austen alone (the name before "@")."""
    lines = []
    for row, twin, data, method in _beside_twins(pruned, "@", lambda r: METHODS[r["method"]].data == "austen"):
        (inside, outside, geo), (twin_in, twin_out, twin_geo) = ratios_to_dense(row, dense), ratios_to_dense(twin, dense)
        lines.append(f"  - Recovery text `{data}` against Austen alone for `{method}`: geometric mean {geo:.2f} "
                     f"against {twin_geo:.2f} ({geo / twin_geo - 1:+.0%}); Northanger Abbey {inside:.2f}× against "
                     f"{twin_in:.2f}×, pydoc {outside:.2f}× against {twin_out:.2f}×, repetition "
                     f"{row['generation']['repetition']:.3f} against {twin['generation']['repetition']:.3f}.")
    return lines


def _beside_twins(pruned: list[dict], separator: str, is_twin) -> list[tuple[dict, dict, str, str]]:
    """(row, its twin, the variant, the twin's method) for each row named METHOD + separator + VARIANT (+ /REST)
    whose twin METHOD (+ /REST) ran: fisher+global/cal:self/lr:8e-4 is fisher+global/lr:8e-4 scored on self."""
    twins = {r["method"]: r for r in pruned if is_twin(r)}
    pairs = []
    for row in pruned:
        method, _, after = row["method"].partition(separator)
        variant, slash, rest = after.partition("/")
        twin = method + slash + rest
        if variant and twin in twins:
            pairs.append((row, twins[twin], variant, twin))
    return pairs


def _target_verdict(inside: float, outside: float, target: tuple[float, float]) -> str:
    parts = []
    for text, ratio, limit in (("Northanger Abbey", inside, target[0]), ("pydoc", outside, target[1])):
        miss = ratio / limit - 1
        decimals = 0 if miss >= 0.01 else 1  # a miss under 1 % would read "0%"
        verdict = "met" if miss <= 0 else f"missed by {miss:.{decimals}%}"
        parts.append(f"{text} ≤ {limit}×: {ratio:.2f}×, {verdict}")
    return "Targets: " + "; ".join(parts) + "."


def _quality_columns(row: dict, dense: dict | None) -> str:
    inside, outside, geo = ratios_to_dense(row, dense) if dense else (float("nan"),) * 3
    fid, gen = row.get("fidelity_pydoc", {}), row.get("generation", {})
    return (f"{row['ppl_austen']:.2f} | {row['ppl_pydoc']:.2f} | {inside:.2f} | {outside:.2f} | {geo:.2f} | "
            f"{fid.get('kl', float('nan')):.3f} | {fid.get('top1_agreement', float('nan')):.3f} | "
            f"{gen.get('repetition', float('nan')):.3f}")


def quality_section(results: dict, command: str) -> str:
    """Markdown table of the suite, with its command, machine and evaluation protocol."""
    s, ev = results["settings"], results["eval"]
    dense = _dense_row(_rows(results))
    lines = [
        "## Quality: in and out of domain after pruning SmolLM2-135M",
        "",
        f"Command: `{command}`. Machine: {results['machine']}.",
        "",
        (f"Every method: Austen training split (Emma, Mansfield Park, Pride and Prejudice, Sense and "
         f"Sensibility), {s['steps']} optimizer steps of 1×{s['seq_len']} tokens, LoRA rank 8 on all "
         f"projections (rows named `/rank:R`: rank R, alpha 2R), lr {s['lr']} (rows named `/lr:X`: X), cubic schedule (masks every {s['prune_every']} "
         f"steps) from {100 * SUITE_SCHEDULE['warmup_fraction']:.0f} % to {100 * (1 - SUITE_SCHEDULE['cooldown_fraction']):.0f} % of the "
         "steps (rows named `/cool:F`: to 1 − F, then masks frozen), global allocation (one whole-model budget spent on the units with the least score per parameter in any layer). "
         "Recovery text: Austen, except where the method's name says `@austen+self` (training samples alternate "
         "between Austen blocks and blocks the dense model sampled, as `prune --data austen+self` does: "
         "temperature 1, each from SmolLM2's chat-turn opening plus 8 Austen tokens; "
         f"{s['steps'] // 2} samples) or `@self` (the model's samples alone, from the chat-turn opening, "
         f"{s['steps']} samples, as `--data self`); the samples are drawn once per seed and shared by every run "
         "(runs/benchmarks/self-text), their sampling time is not in the wall times. Out of domain stays pydoc "
         "for every row, so rows compare (`@self` trains on neither text). "
         "`fisher` is the mask-gradient criterion; `+distill` trains on ½ cross-entropy + ½ KL(dense base ‖ "
         "pruned model) at τ = 1, `+kl` on the KL alone (scored on cross-entropy against tokens sampled from "
         "the dense model); `+bias`: bias compensation (a removed unit outputs its mean, folded into the "
         "o_proj/down_proj bias on export). `llm-pruner` scores once with |∇W⊙W| summed over "
         f"each group, no normalisation, on {s['calibration_blocks']} random training blocks, prunes, then "
         "recovers with LoRA for the same steps. `flap` is FLAP one-shot on the same calibration blocks "
         "(fluctuation × squared column norm, standardised across layers, global allocation, bias "
         "compensation from the calibration means) with no training at all; `flap+lora` recovers after it "
         "like `llm-pruner`. `/cal:TEXT` scores the units on TEXT's training split (`--calibration TEXT`; "
         "corpora joined by `+` alternate block by block, one scoring pass per step of the ramp) while LoRA "
         "still trains on Austen alone; with pydoc in TEXT, pydoc is text the run scored on, so those rows "
         "are not judged out of domain and cannot be picked. `self` in TEXT is text the dense model samples "
         "from BOS alone, as `prune --calibration self` does (temperature 1, one block per step before the "
         "cool-down; sampled once per seed and shared, runs/benchmarks/self-text, its sampling time not in the "
         "wall times): it holds no pydoc, so those rows are judged out of domain. `/every:K` scores the "
         "calibration text on every K-th step of the ramp only (`--calibration-every K`, K times fewer samples); "
         "`/ema:X` averages the scores with λ = X (`--ema X`) instead of 0.9. In domain: perplexity on "
         "Northanger Abbey "
         f"({ev['austen']['tokens']} tokens in {ev['austen']['windows']} windows of {ev['austen']['seq_len']}); "
         f"out of domain: CPython's pydoc topics, validation part ({ev['pydoc']['tokens']} tokens in "
         f"{ev['pydoc']['windows']} windows of {ev['pydoc']['seq_len']}). `in`/`out` are those perplexities "
         "over dense's; `geo` is their geometric mean, the measure defaults are chosen by (ties: repetition). "
         f"KL(dense ‖ pruned) in nats per token and top-1 agreement on the first {s['fidelity_tokens']} pydoc "
         "tokens (the dense logits from the same model with adapters off and masks suspended). Repetition: "
         f"mean share of repeated 4-grams in greedy {s['generation_tokens']}-token continuations of 21 fixed prompts (5 prose, "
         "5 code, 5 facts, 6 instructions in the chat template), batched with left padding; samples in the "
         "JSON. Wall times include evaluation; the two cores were shared with other jobs."),
        "",
        ("| method | target | achieved | parameters | ppl Northanger | ppl pydoc | in | out | geo | KL | top-1 | "
        "repetition | wall s |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in _rows(results):
        lines.append(f"| {row['method']} | {row['target_sparsity']:.2f} | {row['achieved_sparsity']:.4f} | "
                     f"{row['parameters'] / 1e6:.1f} M | {_quality_columns(row, dense)} | {row['wall_seconds']:.0f} |")
    missing = [run_key(*run) for run in expanded_plan(Settings(**{**s, "sparsities": tuple(s["sparsities"])}))
               if run_key(*run) not in results["runs"]]
    lines += ["", *summary_lines(results)]
    if missing:
        lines += ["", f"Not run yet (the suite resumes with the same command): {', '.join(missing)}."]
    lines += ["", "![quality vs sparsity](quality.png) ![loss curves](loss_curves.png)",
              "![kept widths per layer](kept_widths.png)", ""]
    return "\n".join(lines)


def plot(results: dict, folder: Path) -> None:
    """Perplexity vs sparsity per method, loss curves, and per-layer kept widths of the default."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results["runs"].values() if r["seed"] == results["settings"]["seed"]]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    _plot_selection(axes[2], runs)
    for ax, text in zip(axes, ("austen", "pydoc")):
        for name, method in METHODS.items():
            points = sorted((r["achieved_sparsity"], r[f"ppl_{text}"]) for r in runs if r["method"] == name)
            if points and method.pruned:
                ax.plot(*zip(*points), marker="o", label=name)
        for r in runs:
            if not METHODS[r["method"]].pruned:
                ax.axhline(r[f"ppl_{text}"], linestyle="--", linewidth=0.8, color="grey")
        ax.set(xlabel="whole-model sparsity", ylabel="perplexity", yscale="log",
               title="Northanger Abbey" if text == "austen" else "pydoc topics")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "quality.png", dpi=110)
    plt.close(fig)

    sparsities = results["settings"]["sparsities"]
    fig, axes = plt.subplots(1, len(sparsities), figsize=(5.5 * len(sparsities), 4), squeeze=False)
    for ax, sparsity in zip(axes[0], sparsities):
        for r in runs:
            if r["target_sparsity"] == sparsity and r.get("loss_curve"):
                ax.plot(range(1, len(r["loss_curve"]) + 1), r["loss_curve"], linewidth=0.8, label=r["method"])
        ax.set(xlabel="optimizer step", ylabel="training loss (per method: CE or KL)", yscale="log",
               title=f"sparsity {sparsity}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "loss_curves.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    for r in runs:
        if r["method"] in WIDTHS_PLOTTED and r.get("kept_per_layer"):
            layers = range(len(r["kept_per_layer"]))
            label = f"{r['method']} {r['target_sparsity']}"
            style = "-" if r["method"] == DEFAULT_METHOD else "--"
            ax[0].plot(layers, [k["heads"] for k in r["kept_per_layer"]], style, marker=".", label=label)
            ax[1].plot(layers, [k["ffn"] for k in r["kept_per_layer"]], style, marker=".", label=label)
    ax[0].set(xlabel="layer", ylabel="kept query heads", title="attention")
    ax[1].set(xlabel="layer", ylabel="kept FFN channels", title="FFN")
    for a in ax:
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "kept_widths.png", dpi=110)
    plt.close(fig)


def _plot_selection(ax, runs: list[dict]) -> None:
    """The selection measure (geometric mean of the two ratios to dense) against repetition, per run."""
    dense = _dense_row(runs)
    if dense is None:
        return
    for r in runs:
        if METHODS[r["method"]].pruned and "generation" in r:
            geo = ratios_to_dense(r, dense)[2]
            ax.scatter(r["generation"]["repetition"], geo, marker="o" if r["target_sparsity"] < 0.35 else "s")
            ax.annotate(f"{r['method']} {r['target_sparsity']}", (r["generation"]["repetition"], geo), fontsize=6)
    ax.axvline(dense["generation"]["repetition"], linestyle="--", linewidth=0.8, color="grey")
    ax.set(xlabel="repeated 4-grams (dense: dashed)", ylabel="geometric mean of ppl ratios to dense",
           yscale="log", title="selection measure")


def budget_section(folder: Path) -> str:
    """The default method in and out of domain after each budget of BUDGET_STEPS, from their results files."""
    lines = ["## Quality: the training budget", "",
             ("`fisher` with global allocation, cross-entropy on Austen, at each budget (`python benchmarks/quality.py "
             "--steps N`; 128 is the main suite's run); otherwise the protocol of the section above. "
             "`/cal:austen+pydoc` scores the units on Austen and pydoc's training split alternately "
             "(`--calibration austen+pydoc`), so its pydoc column is text the run scored on, not unseen text; "
             "`/cal:self` scores them on text the dense model samples from BOS (`--calibration self`: one block "
             "per step before the cool-down), so pydoc stays unseen."), "",
             "| method | steps | target | ppl Northanger | ppl pydoc | in | out | geo | repetition |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    missing, base_seconds = [], {}
    for steps in BUDGET_STEPS:
        path = folder / results_name(False, steps)
        runs = json.loads(path.read_text())["runs"] if path.exists() else {}
        dense = runs.get(run_key("dense", 0.0, 0))
        for method in BUDGET_METHODS:
            for sparsity in (0.2, 0.5):
                row = runs.get(run_key(method, sparsity, 0))
                if method == "fisher+global" and row is not None:  # the pace of the longest budget run so far
                    base_seconds[sparsity] = row["wall_seconds"] / steps
                if method == "fisher+global" and (row is None or dense is None):
                    missing.append((steps, sparsity))
                if row is None or dense is None:
                    continue
                inside, outside, geo = ratios_to_dense(row, dense)
                lines.append(f"| {method} | {steps} | {sparsity} | {row['ppl_austen']:.2f} | {row['ppl_pydoc']:.2f} | "
                             f"{inside:.2f} | {outside:.2f} | {geo:.2f} | {row['generation']['repetition']:.3f} |")
    lines += ["", *budget_trend(folder)]
    if missing:
        lines += ["", "Not run yet (the machine's time ran out; each resumes with its command): " + "; ".join(
            f"{steps} steps at {sparsity}" + (f" (about {steps * base_seconds[sparsity] / 3600:.1f} h at the pace of "
                                             "the longest run above, evaluation included)"
                                             if sparsity in base_seconds else "")
            for steps, sparsity in missing) + "."]
    return "\n".join(lines) + "\n"


def budget_trend(folder: Path) -> list[str]:
    """One sentence: from the shortest to the longest budget run, what changed in and out of domain."""
    rows = {}
    for steps in BUDGET_STEPS:
        path = folder / results_name(False, steps)
        runs = json.loads(path.read_text())["runs"] if path.exists() else {}
        for sparsity in (0.2, 0.5):
            if run_key("dense", 0.0, 0) in runs and run_key("fisher+global", sparsity, 0) in runs:
                row = runs[run_key("fisher+global", sparsity, 0)]
                rows.setdefault(sparsity, []).append((steps, *ratios_to_dense(row, runs[run_key("dense", 0.0, 0)]),
                                                      row["generation"]["repetition"]))
    # (sparsity, shortest budget's figures, longest budget's figures): each (steps, in, out, geo, repetition)
    spans = [(sparsity, budgets[0], budgets[-1]) for sparsity, budgets in rows.items() if len(budgets) > 1]
    if not spans:
        return []
    changes = [f"at {sparsity:.0%} from {first[0]} to {last[0]} steps, in domain {first[1]:.2f}× → {last[1]:.2f}×, "
               f"out of domain {first[2]:.2f}× → {last[2]:.2f}×, repetition {first[4]:.3f} → {last[4]:.3f}"
               for sparsity, first, last in spans]
    outside = [f"at {sparsity:.0%} {_direction(first[2], last[2])} ({last[2]:.1f}× after {last[0]} steps, target "
               f"≤ {TARGETS[sparsity][1]:g}×)" for sparsity, first, last in spans]
    return ["Longer recovery on Austen: " + "; ".join(changes) + ". More training on one book closes the in-domain "
            "gap; the out-of-domain ratio (pydoc) " + "; ".join(outside) + ": what pruning cut on Austen's scores "
            "comes back slowly or not at all from Austen."]


def _direction(before: float, after: float) -> str:
    """How a ratio moved, ignoring changes under 5 %."""
    return "falls" if after < 0.95 * before else "grows" if after > 1.05 * before else "stays"


def results_name(quick: bool, steps: int | None) -> str:
    """Each budget its own file (the budget curve's 512 and 2,048 steps must not replace the 128-step runs)."""
    if quick:
        return "quality-quick.json"
    return f"quality-{steps}steps.json" if steps and steps != Settings().steps else "quality.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: a few steps, small evaluation")
    parser.add_argument("--steps", type=int, default=None, help="override the optimizer steps per run")
    parser.add_argument("--results", type=Path, default=None, help="JSON file (default docs/results/quality.json)")
    parser.add_argument("--no-docs", action="store_true", help="do not write docs/benchmarks.md or plots")
    parser.add_argument("--from-json", action="store_true", help="rewrite the docs from saved results, no runs")
    parser.add_argument("--from-the-end", action="store_true",
                        help="take the plan from its last run backwards (a second process sharing the file)")
    parser.add_argument("--only", nargs="+", metavar="KEY", default=None,
                        help="run only these runs of the plan, by method (every sparsity) or run key "
                             "(e.g. fisher+global@austen+self@0.2)")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else Settings()
    if args.steps and args.steps != settings.steps:  # a point of the budget curve: only the default method
        settings = Settings(**{**asdict(settings), "steps": args.steps, "plan": BUDGET_PLAN})
    path = args.results or RESULTS / results_name(args.quick, args.steps)
    if args.from_json:
        results = json.loads(path.read_text())
        args.steps = results["settings"]["steps"] if results["settings"]["steps"] != Settings().steps else None
    else:
        plan_keys = {run_key(*run) for run in expanded_plan(settings)}
        if args.only and not set(args.only) <= plan_keys | set(METHODS):
            parser.error(f"--only takes methods or run keys of the plan: {', '.join(sorted(plan_keys))}")
        results = run_suite(settings, path, args.from_the_end, set(args.only or ()))
    if not args.no_docs:
        command = "python benchmarks/quality.py" + (" --quick" if args.quick else "") + \
                  (f" --steps {args.steps}" if args.steps else "")
        if path.name == "quality.json" or args.quick:
            write_section("quality", quality_section(results, command))
            plot(results, path.parent.parent)
        write_section("quality-budget", budget_section(path.parent))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
