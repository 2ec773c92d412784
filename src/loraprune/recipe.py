"""The recipe: prune attention units and FFN channels while fine-tuning LoRA, then export.

Read top to bottom: load → solve the target → wrap with LoRA and masks → train, scoring units
from LoRA gradients every step and shrinking masks on the cubic schedule → recover → export.
"""

from __future__ import annotations

import hashlib
import json
import logging
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from tqdm.auto import tqdm
from transformers import PreTrainedModel, get_scheduler

from loraprune.checkpoint import LoadedCheckpoint, RngSnapshot, RunState, capture_rng, save_checkpoint
from loraprune.config import PruneConfig
from loraprune.criteria import needs_weight_gradients
from loraprune.errors import LoraPruneError
from loraprune.groups import LayerShape
from loraprune.importance import MovingAverageScores, model_scores
from loraprune.masks import ModelMasks, removed_parameters
from loraprune.models import ArchSpec, count_parameters, decoder_layers, spec_for
from loraprune.sampling import BlockStream
from loraprune.schedule import PruningSchedule
from loraprune.selection import update_layer_mask
from loraprune.target import PruneTarget, solve_target

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"
LOG_FILE = "log.jsonl"


class RunInterrupted(LoraPruneError):
    """Ctrl-C during a run: a checkpoint was written and the run can be resumed."""

    exit_code = 130


@dataclass
class TrainingOutcome:
    """What the training loop hands back: the adapted, masked model and how it got there."""

    model: torch.nn.Module  # PEFT model with masks attached
    masks: ModelMasks
    target: PruneTarget | None  # None when masks were given, not solved
    achieved_sparsity: float
    steps: int
    seconds: float
    final_loss: float


def partial_dir(out: Path) -> Path:
    """Where an unfinished run keeps its checkpoints until the pruned model is exported."""
    return out.with_name(out.name + PARTIAL_SUFFIX)


def model_fingerprint(model: PreTrainedModel) -> str:
    """Identify a base model by its config and a checksum of its embedding, to catch mix-ups."""
    config = model.config.to_dict()
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "intermediate_size", "vocab_size")
    embedding = model.get_input_embeddings().weight
    checksum = f"{embedding.double().sum().item():.6e}"
    text = json.dumps({k: config.get(k) for k in keys}, sort_keys=True) + checksum
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def solve_model_target(model: PreTrainedModel, config: PruneConfig) -> PruneTarget:
    """Per-layer removal counts for this model and config (fails early if unreachable)."""
    shape = LayerShape.from_config(model.config)
    return solve_target(
        shape, model.config.num_hidden_layers, count_parameters(model), config.sparsity,
        unit=config.attention_unit, attention_fraction=config.attention_fraction,
        skip_first=config.skip_first_layers, skip_last=config.skip_last_layers,
        round_to=config.round_to, attention_bias=_has_attention_bias(model, spec_for(model.config)),
        mlp_bias=bool(getattr(model.config, "mlp_bias", False)))


def _has_attention_bias(model: torch.nn.Module, spec: ArchSpec) -> bool:
    attention = getattr(decoder_layers(model, spec)[0], spec.attention)
    return getattr(attention, spec.q_proj).bias is not None


def wrap_with_lora(model: PreTrainedModel, config: PruneConfig, spec: ArchSpec) -> torch.nn.Module:
    """Add LoRA adapters (PEFT); for the grad criterion also let the frozen projections get ∇W."""
    lora = LoraConfig(r=config.lora.rank, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                      target_modules=list(config.lora.target_modules), bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    if needs_weight_gradients(config.criterion):
        # The vanilla criterion needs ∇W of every prunable projection: pay for it for real.
        prunable = set(spec.projection_names)
        for name, parameter in peft_model.named_parameters():
            if "base_layer.weight" in name and name.split(".")[-3] in prunable:
                parameter.requires_grad_(True)
    return peft_model


def _weight_grads_free(model: torch.nn.Module) -> None:
    for name, parameter in model.named_parameters():
        if "lora_" not in name and parameter.grad is not None:
            parameter.grad = None


def compute_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of a batch of token blocks."""
    return model(input_ids=batch, labels=batch, use_cache=False).loss


def _update_masks(masks: ModelMasks, scores: MovingAverageScores, target: PruneTarget,
                  shape: LayerShape, fraction: float) -> None:
    attention_removed = round(fraction * target.attention_units_removed)
    ffn_removed = round(fraction * target.ffn_channels_removed)
    for index in target.pruned_layers:
        layer_scores = scores.layers.get(index)
        if layer_scores is None:
            log.warning("layer %d has no finite scores yet; its mask waits for the next update", index)
            continue
        update_layer_mask(masks.layers[index], layer_scores, shape, target.attention_unit,
                          attention_removed, ffn_removed)


def _append_log(run_dir: Path, record: dict) -> None:
    with open(run_dir / LOG_FILE, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def _logged_step(line: str) -> float:
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:  # a line cut short by a kill: drop it with the later ones
        return float("inf")


def _truncate_log(run_dir: Path, last_step: int) -> None:
    """Drop log lines written after the checkpoint a resumed run starts from."""
    path = run_dir / LOG_FILE
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if line and _logged_step(line) <= last_step]
        path.write_text("".join(line + "\n" for line in kept))


@contextmanager
def _interrupts_held() -> Iterator[list[bool]]:
    """Hold Ctrl-C while a step commits its updates; the yielded flag says whether one came."""
    arrived = [False]
    if threading.current_thread() is not threading.main_thread():
        yield arrived
        return
    previous = signal.signal(signal.SIGINT, lambda *_: arrived.__setitem__(0, True))
    try:
        yield arrived
    finally:
        signal.signal(signal.SIGINT, previous)


def train_and_prune(model: PreTrainedModel, train_blocks: torch.Tensor, config: PruneConfig,
                    run_dir: Path, checkpoint: LoadedCheckpoint | None = None,
                    progress: bool = True, fixed_masks: ModelMasks | None = None) -> TrainingOutcome:
    """Fine-tune LoRA on ``train_blocks`` while masks shrink to the target; checkpoint as we go.

    With ``fixed_masks`` nothing is scored or pruned: LoRA only recovers the model under those
    masks (one-shot pruning followed by recovery, or plain fine-tuning with full masks).
    """
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(config.seed)
    spec, shape = spec_for(model.config), LayerShape.from_config(model.config)
    pruning = fixed_masks is None
    target = solve_model_target(model, config) if pruning else None
    schedule = PruningSchedule.build(config.steps, config.warmup_fraction, config.cooldown_fraction,
                                     config.prune_every) if pruning else None
    attention_bias = _has_attention_bias(model, spec)
    mlp_bias = bool(getattr(model.config, "mlp_bias", False))
    fingerprint = model_fingerprint(model)
    total_parameters = count_parameters(model)
    if pruning:
        accelerator.print(f"target: {target.describe(shape)}")

    peft_model = wrap_with_lora(model, config, spec)
    masks = fixed_masks if fixed_masks is not None else ModelMasks.full(shape, model.config.num_hidden_layers)
    masks.attach(peft_model, spec)
    scores = MovingAverageScores(config.ema)
    trainable = [p for n, p in peft_model.named_parameters() if "lora_" in n]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = get_scheduler(config.lr_schedule, optimizer, num_warmup_steps=0,
                              num_training_steps=config.steps)
    step, samples_seen = 0, 0
    if checkpoint is not None:
        set_peft_model_state_dict(peft_model, checkpoint.adapter)
        optimizer.load_state_dict(checkpoint.optimizer)
        scheduler.load_state_dict(checkpoint.scheduler)
        masks.load_state_dict(checkpoint.masks)
        scores.load_state_dict(checkpoint.scores)
        checkpoint.restore_rng()
        step, samples_seen = checkpoint.state.step, checkpoint.state.samples_seen
        _truncate_log(run_dir, step)
        accelerator.print(f"resumed from step {step} of {config.steps}")

    peft_model, optimizer = accelerator.prepare(peft_model, optimizer)
    inner = accelerator.unwrap_model(peft_model)
    layers = decoder_layers(inner, spec)
    stream = BlockStream(train_blocks, config.seed, config.batch_size, accelerator.process_index,
                         accelerator.num_processes, samples_seen)

    def checkpoint_now(at_step: int, samples: int, rng: RngSnapshot) -> Path:
        state = RunState(at_step, samples, fingerprint, config.to_dict())
        return save_checkpoint(run_dir, state, get_peft_model_state_dict(inner), optimizer.state_dict(),
                               scheduler.state_dict(), masks.state_dict(), scores.state_dict(), rng)

    def interrupted(at_step: int, samples: int, rng: RngSnapshot) -> RunInterrupted:
        optimizer.zero_grad(set_to_none=True)
        checkpoint_now(at_step, samples, rng)
        return RunInterrupted(f"interrupted after step {at_step}; checkpoint saved in {run_dir}. "
                              f"Resume with: loraprune prune --resume {run_dir}")

    peft_model.train()
    started, loss_value = time.perf_counter(), float("nan")
    bar = tqdm(total=config.steps, initial=step, desc="pruning", unit="step",
               disable=not (progress and accelerator.is_main_process))
    while step < config.steps:
        rng_at_step_start, samples_at_step_start = capture_rng(), stream.samples_seen
        try:
            step_loss = 0.0
            for micro in range(config.grad_accumulation):
                batch = stream.next_batch().to(accelerator.device)
                syncing = micro == config.grad_accumulation - 1
                context = nullcontext() if syncing else accelerator.no_sync(peft_model)
                with context:
                    loss = compute_loss(peft_model, batch) / config.grad_accumulation
                    if not torch.isfinite(loss):
                        if accelerator.is_main_process:
                            checkpoint_now(step, samples_at_step_start, rng_at_step_start)
                        raise LoraPruneError(
                            f"loss became {loss.item()} at step {step + 1}; the last good step ({step}) "
                            f"is checkpointed in {run_dir}. Fix the text and resume with --resume "
                            f"{run_dir}, or start a new run with a lower --lr (resuming keeps the settings)")
                    accelerator.backward(loss)
                step_loss += loss.item()
            grad_norm = accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
            fresh_scores = None
            if pruning and step < schedule.end_step:  # masks freeze afterwards; scores would go unused
                fresh_scores = model_scores(layers, target.pruned_layers, spec, shape, target.attention_unit,
                                            config.criterion, config.score_power, config.normalise_scores,
                                            config.seed, config.lora_columns)
        except KeyboardInterrupt:
            if accelerator.is_main_process:
                raise interrupted(step, samples_at_step_start, rng_at_step_start) from None
            raise
        # From here the step changes state; a checkpoint must hold all of it or none of it.
        with _interrupts_held() as ctrl_c:
            if fresh_scores is not None:
                scores.update(fresh_scores)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            _weight_grads_free(inner)
            step += 1
            loss_value = step_loss
            if pruning and schedule.updates_masks(step):
                _update_masks(masks, scores, target, shape, schedule.fraction(step))
            sparsity = removed_parameters(masks, shape, attention_bias, mlp_bias) / total_parameters
            lr = scheduler.get_last_lr()[0]
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", sparsity=f"{sparsity:.3f}", lr=f"{lr:.2e}")
            if accelerator.is_main_process:
                _append_log(run_dir, {"step": step, "loss": loss_value, "sparsity": sparsity, "lr": lr,
                                      "grad_norm": float(grad_norm), "seconds": time.perf_counter() - started})
                if step % config.save_every == 0 or step == config.steps:
                    checkpoint_now(step, stream.samples_seen, capture_rng())
        if ctrl_c[0]:
            if accelerator.is_main_process:
                raise interrupted(step, stream.samples_seen, capture_rng())
            raise KeyboardInterrupt
    bar.close()
    accelerator.wait_for_everyone()
    achieved = removed_parameters(masks, shape, attention_bias, mlp_bias) / total_parameters
    return TrainingOutcome(inner, masks, target, achieved, step, time.perf_counter() - started, loss_value)
