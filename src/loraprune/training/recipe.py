"""The recipe: fine-tune LoRA while masks shrink to the target, one optimizer step at a time.

Read ``PruningRecipe.run`` top to bottom; every step is four phases:
forward/backward over the micro-batches → score the units → commit (moving average, optimizer,
masks, log, checkpoint) → stop here if Ctrl-C came. Set-up happens once in ``__init__``.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedType
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from tqdm.auto import tqdm
from transformers import PreTrainedModel, get_scheduler

from loraprune.config import PruneConfig
from loraprune.data.blocks import split_labels
from loraprune.data.sampling import BlockStream
from loraprune.errors import LoraPruneError
from loraprune.models import count_parameters, projection_biases, spec_for
from loraprune.models.loading import parse_dtype
from loraprune.pruning.groups import LayerShape
from loraprune.pruning.masks import ModelMasks, removed_parameters
from loraprune.pruning.schedule import PruningSchedule
from loraprune.pruning.scorers import Scorer, ScoringPlan, build_scorer
from loraprune.pruning.scores import LayerScores, MovingAverageScores
from loraprune.pruning.selection import shrink_masks
from loraprune.pruning.target import GlobalTarget, PruneTarget, solve_model_target
from loraprune.training.checkpoint import (
    LoadedCheckpoint,
    RngSnapshot,
    RunState,
    capture_rng,
    model_fingerprint,
    save_checkpoint,
)
from loraprune.training.lora import clear_weight_gradients, trainable_parameters, wrap_with_lora
from loraprune.training.losses import build_loss
from loraprune.training.run_folder import append_log, truncate_log
from loraprune.training.sharding import (
    frozen_weight_bytes,
    full_optimizer_state,
    full_state,
    full_tensor,
    shard_model,
    sharded_optimizer_state,
)

log = logging.getLogger(__name__)


class RunInterrupted(LoraPruneError):
    """Ctrl-C during a run: a checkpoint was written and the run can be resumed."""

    exit_code = 130


@dataclass
class TrainingOutcome:
    """What the recipe hands back: the adapted, masked model and how it got there."""

    model: torch.nn.Module  # PEFT model with masks attached
    masks: ModelMasks
    target: PruneTarget | GlobalTarget | None  # None when masks were given, not solved
    achieved_sparsity: float
    steps: int
    seconds: float
    final_loss: float
    sharded: bool = False  # the model's weights are FSDP2 shards: gather before using it alone
    frozen_bytes: tuple[int, int] = (0, 0)  # (most any process held, whole model) of frozen weights


@dataclass
class StepStart:
    """Where a step began: what a checkpoint of the state before it must hold."""

    samples_seen: int
    rng: RngSnapshot


def train_while_pruning(model: PreTrainedModel, train_blocks: torch.Tensor | list[torch.Tensor],
                        config: PruneConfig, run_dir: Path, checkpoint: LoadedCheckpoint | None = None,
                        progress: bool = True, fixed_masks: ModelMasks | None = None,
                        calibration_blocks: list[torch.Tensor] | None = None) -> TrainingOutcome:
    """Fine-tune LoRA on ``train_blocks`` (several sources alternate) while masks shrink to the target; checkpoint as we go.

    With ``fixed_masks`` nothing is scored or pruned: LoRA only recovers the model under those
    masks (one-shot pruning followed by recovery, or plain fine-tuning with full masks). With
    ``calibration_blocks`` the units are scored on those (sources alternate) instead of the training text.
    """
    return PruningRecipe(model, train_blocks, config, run_dir, checkpoint, progress, fixed_masks,
                         calibration_blocks).run()


class PruningRecipe:
    """One pruning run's state and its phases; ``run`` is the loop."""

    def __init__(self, model: PreTrainedModel, train_blocks: torch.Tensor | list[torch.Tensor],
                 config: PruneConfig, run_dir: Path, checkpoint: LoadedCheckpoint | None = None, progress: bool = True,
                 fixed_masks: ModelMasks | None = None, calibration_blocks: list[torch.Tensor] | None = None):
        self.config, self.run_dir, self.progress = config, run_dir, progress
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        # An accelerate config with distributed_type FSDP asks for sharding too; loraprune does it itself.
        self.sharded = self.accelerator.num_processes > 1 and (
            config.parallel == "fsdp" or self.accelerator.distributed_type == DistributedType.FSDP)
        torch.manual_seed(config.seed)
        self.spec, self.shape = spec_for(model.config), LayerShape.from_config(model.config)
        self.biases = projection_biases(model, self.spec)
        self.fingerprint = model_fingerprint(model)
        self.total_parameters = count_parameters(model)
        self.pruning = fixed_masks is None
        self.target = solve_model_target(model, config) if self.pruning else None
        self.schedule = PruningSchedule.for_config(config) if self.pruning else None
        if self.pruning:
            self.accelerator.print(f"target: {self.target.describe(self.shape)}")

        if not self.sharded:  # sharded, each process moves only its shards (in shard_model)
            model.to(self.accelerator.device)  # masks, scores and adapters are all made on this device
        peft_model = wrap_with_lora(model, config, self.spec)
        if checkpoint is not None:  # whole tensors, so before sharding
            set_peft_model_state_dict(peft_model, checkpoint.adapter)
        if self.sharded:
            shard_model(peft_model, self.spec, self.accelerator.device)
        self.frozen_bytes = self._frozen_bytes(peft_model)
        self.masks = fixed_masks if fixed_masks is not None else ModelMasks.for_model(peft_model)
        if config.bias_compensation:
            self.masks.compensate(self.shape.head_dim)
        self.masks.to(self.accelerator.device)
        self.masks.attach(peft_model, self.spec)
        self.scores = MovingAverageScores(config.ema)
        self.loss = build_loss(config)
        self.trainable = trainable_parameters(peft_model)
        optimizer = torch.optim.AdamW(self.trainable, lr=config.lr, weight_decay=config.weight_decay)
        self.lr_scheduler = get_scheduler(config.lr_schedule, optimizer, num_warmup_steps=0,
                                          num_training_steps=config.steps)
        self.step, samples_seen = 0, 0
        if checkpoint is not None:
            samples_seen = self._restore(checkpoint, optimizer)

        if self.sharded:  # FSDP2 reduces the gradients itself; accelerate would add DDP on top
            self.model, self.optimizer, self.inner = peft_model, optimizer, peft_model
        else:
            self.model, self.optimizer = self.accelerator.prepare(peft_model, optimizer)
            self.inner = self.accelerator.unwrap_model(self.model)
        self.scorer = self._attached_scorer()
        self.stream = BlockStream(train_blocks, config.seed, config.batch_size, self.accelerator.process_index,
                                  self.accelerator.num_processes, samples_seen)
        # Every scored step draws one calibration batch per micro-batch, so the step fixes where a resumed run is.
        per_step = config.batch_size * config.grad_accumulation * self.accelerator.num_processes
        self.calibration = None if not calibration_blocks or not self.pruning else BlockStream(
            calibration_blocks, config.seed, config.batch_size, self.accelerator.process_index,
            self.accelerator.num_processes, self.schedule.scored_steps(self.step, config.calibration_every) * per_step)

    def _frozen_bytes(self, model: torch.nn.Module) -> tuple[int, int]:
        """(most frozen-weight bytes any process holds, bytes of all frozen weights)."""
        local, whole = frozen_weight_bytes(model)
        if self.accelerator.num_processes > 1:
            most = torch.tensor(local, device=self.accelerator.device)
            torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
            local = int(most)
        return local, whole

    def _restore(self, checkpoint: LoadedCheckpoint, optimizer: torch.optim.Optimizer) -> int:
        """Load a checkpoint's state (the adapter is already in) into this run; returns the samples it had consumed."""
        saved = checkpoint.optimizer
        optimizer.load_state_dict(sharded_optimizer_state(saved, self.trainable) if self.sharded else saved)
        self.lr_scheduler.load_state_dict(checkpoint.scheduler)
        self.masks.load_state_dict(checkpoint.masks)
        self.scores.load_state_dict(checkpoint.scores, self.accelerator.device)
        checkpoint.restore_rng()
        self.step = checkpoint.state.step
        truncate_log(self.run_dir, self.step)
        self.accelerator.print(f"resumed from step {self.step} of {self.config.steps}")
        return checkpoint.state.samples_seen

    def _attached_scorer(self) -> Scorer | None:
        if not self.pruning:
            return None
        plan = ScoringPlan(self.spec, self.shape, self.target.attention_unit, self.target.pruned_layers)
        scorer = build_scorer(self.config, plan)
        scorer.attach(self.inner)
        scorer.compensate_with(self.masks.means)
        return scorer

    def run(self) -> TrainingOutcome:
        """Train until ``config.steps``; Ctrl-C and a non-finite loss leave a resumable checkpoint."""
        self.model.train()
        started, loss_value = time.perf_counter(), float("nan")
        bar = tqdm(total=self.config.steps, initial=self.step, desc="pruning", unit="step",
                   disable=not (self.progress and self.accelerator.is_main_process))
        while self.step < self.config.steps:
            start = StepStart(self.stream.samples_seen, capture_rng())
            try:
                loss_value = self.forward_backward(start)
                grad_norm = self._clip_gradients()
                fresh_scores = self.score()
            except KeyboardInterrupt:
                if self.accelerator.is_main_process:
                    raise self._interrupted(self.step, start) from None
                raise
            # From here the step changes state; a checkpoint must hold all of it or none of it.
            with _interrupts_held() as ctrl_c:
                record = self.commit(fresh_scores, loss_value, float(grad_norm), started)
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.3f}", sparsity=f"{record['sparsity']:.3f}",
                                lr=f"{record['lr']:.2e}")
            if ctrl_c[0]:
                if self.accelerator.is_main_process:
                    raise self._interrupted(self.step, StepStart(self.stream.samples_seen, capture_rng()))
                raise KeyboardInterrupt
        bar.close()
        self.accelerator.wait_for_everyone()
        return TrainingOutcome(self.inner, self.masks, self.target, self._sparsity(), self.step,
                               time.perf_counter() - started, loss_value, self.sharded, self.frozen_bytes)

    def _clip_gradients(self) -> torch.Tensor:
        if self.sharded:  # torch's clipping sums the norm over all shards
            return full_tensor(torch.nn.utils.clip_grad_norm_(self.trainable, self.config.max_grad_norm))
        return self.accelerator.clip_grad_norm_(self.trainable, self.config.max_grad_norm)

    def forward_backward(self, start: StepStart) -> float:
        """Accumulate gradients over the step's micro-batches; returns the step's loss."""
        accumulation, step_loss = self.config.grad_accumulation, 0.0
        scoring_calibration = self.calibration is not None
        if scoring_calibration:
            self._score_calibration(accumulation)
        separate_scoring = self._scoring_this_step() and self.scorer.takes_scoring_loss and not scoring_calibration
        for micro in range(accumulation):
            batch, labels = split_labels(self.stream.next_batch().to(self.accelerator.device))
            syncing = micro == accumulation - 1
            teacher_logits = self._teacher_logits(batch) if self.loss.needs_teacher else None
            with nullcontext() if syncing or self.sharded else self.accelerator.no_sync(self.model), self._autocast():
                if separate_scoring:
                    with self.scorer.recording_inputs() as watched:
                        loss, scoring_loss = self.loss.with_scoring_loss(self.model, batch, teacher_logits,
                                                                         labels=labels)
                else:
                    loss, scoring_loss = self.loss(self.model, batch, teacher_logits, labels=labels), None
                loss = loss / accumulation
                if not torch.isfinite(loss):
                    self._stop_on_bad_loss(loss, start)
                if scoring_loss is not None:
                    # The scorer's hooks read this pass; the adapters' gradients come from the loss below.
                    torch.autograd.grad(scoring_loss / accumulation, watched, retain_graph=True)
                scored_elsewhere = scoring_loss is not None or scoring_calibration
                with self.scorer.ignoring_backward() if scored_elsewhere else nullcontext():
                    self.accelerator.backward(loss)
            step_loss += loss.item()
        return step_loss

    def _score_calibration(self, accumulation: int) -> None:
        """The scorer's hooks read cross-entropy on calibration batches; the adapters learn nothing from them."""
        if not self._scoring_this_step():
            return
        for _ in range(accumulation):
            batch, labels = split_labels(self.calibration.next_batch().to(self.accelerator.device))
            # The unwrapped model: a pass no optimizer step follows needs no gradient synchronisation.
            with self.scorer.recording_inputs() as watched, self._autocast():
                loss = self.inner(input_ids=batch, labels=batch if labels is None else labels, use_cache=False).loss
            torch.autograd.grad(loss / accumulation, watched)

    def _scoring_this_step(self) -> bool:
        every = self.config.calibration_every if self.calibration is not None else 1
        return self.pruning and self.schedule.scores_after(self.step, every)

    def _autocast(self):
        """On CUDA with a half-precision base, autocast the float32 LoRA path too; elsewhere nothing.

        The frozen base is already in ``config.dtype``; LoRA weights, their AdamW state and every
        score stay float32 (PEFT casts the adapters up). float16 runs without loss scaling.
        """
        if self.accelerator.device.type == "cuda" and self.config.dtype != "float32":
            return torch.autocast("cuda", dtype=parse_dtype(self.config.dtype))
        return nullcontext()

    @torch.no_grad()
    def _teacher_logits(self, batch: torch.Tensor) -> torch.Tensor:
        """The unpruned base model's logits: adapters off, masks off; its weights are already here."""
        with self.inner.disable_adapter(), self.masks.suspended(), self._autocast():
            return self.inner(input_ids=batch, use_cache=False).logits

    def score(self) -> dict[int, LayerScores] | None:
        """This step's unit scores, or None when masks no longer change (pruning done or off)."""
        return self.scorer.step_scores() if self._scoring_this_step() else None

    def commit(self, fresh_scores: dict[int, LayerScores] | None, loss_value: float, grad_norm: float,
               started: float) -> dict:
        """Moving average → optimizer → masks → log → checkpoint; returns the step's log record."""
        if fresh_scores is not None:
            self.scores.update(fresh_scores)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        clear_weight_gradients(self.inner)
        self.step += 1
        if self.pruning and self.schedule.updates_masks(self.step):
            self._update_masks(self.schedule.fraction(self.step))
        record = {"step": self.step, "loss": loss_value, "sparsity": self._sparsity(),
                  "lr": self.lr_scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                  "seconds": time.perf_counter() - started}
        if self.accelerator.is_main_process:
            append_log(self.run_dir, record)
        if self.step % self.config.save_every == 0 or self.step == self.config.steps:
            # Sharded, every process gathers its part of the state; the main one writes it.
            self._checkpoint(self.step, StepStart(self.stream.samples_seen, capture_rng()))
        return record

    def _update_masks(self, fraction: float) -> None:
        """Shrink the masks to ``fraction`` of the target, lowest moving-average scores first."""
        shrink_masks(self.masks, self.scores.layers, self.shape, self.target, fraction)

    def _sparsity(self) -> float:
        return removed_parameters(self.masks, self.shape, *self.biases) / self.total_parameters

    def _checkpoint(self, at_step: int, start: StepStart) -> None:
        """Write the run's state; sharded, every process must call this (the shards are gathered)."""
        adapter = get_peft_model_state_dict(self.inner)
        optimizer = self.optimizer.state_dict()
        if self.sharded:
            adapter, optimizer = full_state(adapter), full_optimizer_state(optimizer)
        if self.accelerator.is_main_process:
            state = RunState(at_step, start.samples_seen, self.fingerprint, self.config.to_dict())
            save_checkpoint(self.run_dir, state, adapter, optimizer, self.lr_scheduler.state_dict(),
                            self.masks.state_dict(), self.scores.state_dict(), start.rng)

    def _interrupted(self, at_step: int, start: StepStart) -> RunInterrupted:
        if self.sharded:  # gathering needs every process, and they may not all be here
            return RunInterrupted(f"interrupted after step {at_step}; the last checkpoint (every "
                                  f"--save-every steps) is in {self.run_dir}. Resume with: "
                                  f"loraprune prune --resume {self.run_dir}")
        self.optimizer.zero_grad(set_to_none=True)
        self._checkpoint(at_step, start)
        return RunInterrupted(f"interrupted after step {at_step}; checkpoint saved in {self.run_dir}. "
                              f"Resume with: loraprune prune --resume {self.run_dir}")

    def _stop_on_bad_loss(self, loss: torch.Tensor, start: StepStart) -> None:
        saved = "the last checkpoint (every --save-every steps)" if self.sharded else f"the last good step ({self.step})"
        if self.accelerator.is_main_process and not self.sharded:
            self._checkpoint(self.step, start)
        raise LoraPruneError(
            f"loss became {loss.item()} at step {self.step + 1}; {saved} "
            f"is checkpointed in {self.run_dir}. Fix the text and resume with --resume "
            f"{self.run_dir}, or start a new run with a lower --lr (resuming keeps the settings)")


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
