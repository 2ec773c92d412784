"""Text from the model itself: recovery text (``--data self``, alone or mixed as ``austen+self``) and
scoring text (``--calibration self``).

The frozen dense model samples blocks at temperature 1 before training starts. Recovery text starts
from short prompts (BOS, or the start of a chat turn when the tokenizer has a chat template, plus a
few tokens drawn from the user's text when there is one). Scoring text starts from BOS alone: the
model's unconditioned distribution, all the kinds of text it was trained on, which is what the
units that survive must keep serving. Each sequence is exactly one block and does not stop at EOS:
a chat model goes on with the next turn, a base model with the next document.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from loraprune.errors import LoraPruneError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SELF = "self"
SELF_FILE = "self_generated.npz"
CALIBRATION_FILE = "self_calibration.npz"  # --calibration self: the scoring samples, apart from recovery text
PROMPT_TOKENS = 8  # tokens of the user's text that start each sampled sequence
GENERATION_BATCH = 16  # sequences sampled at once (KV cache per sequence)
VALIDATION_FRACTION = 0.1  # held-out generated blocks, the validation text of --data self alone
_CONTENT_MARK = "\x00LORAPRUNE\x00"


@dataclass(frozen=True)
class DataSpec:
    """A --data value split into its corpus (or None) and whether self-generated text joins it."""

    corpus: str | None
    with_self: bool

    @property
    def validation_generated(self) -> bool:
        """Validation text is held-out generated text only when there is no corpus to validate on."""
        return self.corpus is None


def parse_data(data: str) -> DataSpec:
    """Split ``self``, ``CORPUS+self`` or ``self+CORPUS`` (or a plain corpus) into a DataSpec."""
    if data == SELF:
        return DataSpec(None, True)
    for corpus in (data[: -len("+self")] if data.endswith("+self") else None,
                   data[len("self+"):] if data.startswith("self+") else None):
        if corpus is not None:
            if not corpus or parse_data(corpus).with_self:
                raise LoraPruneError(f"--data {data!r}: mix self with one corpus, e.g. austen+self")
            return DataSpec(corpus, True)
    return DataSpec(data, False)


@dataclass
class GeneratedText:
    """Blocks the model sampled: (n, seq_len) for training and held-out (m, seq_len) for validation."""

    train: torch.Tensor
    validation: torch.Tensor

    def save(self, run_dir: Path, name: str = SELF_FILE) -> None:
        """Write both parts into the run folder atomically, so --resume reads the same tokens."""
        with tempfile.NamedTemporaryFile(dir=run_dir, suffix=".tmp", delete=False) as f:
            np.savez(f, train=self.train.numpy().astype(np.int32), validation=self.validation.numpy().astype(np.int32))
        os.replace(f.name, run_dir / name)

    @classmethod
    def load(cls, run_dir: Path, name: str = SELF_FILE) -> GeneratedText | None:
        """The text a run generated earlier, or None if it has none."""
        path = run_dir / name
        if not path.is_file():
            return None
        with np.load(path) as saved:
            return cls(torch.from_numpy(saved["train"].astype(np.int64)),
                       torch.from_numpy(saved["validation"].astype(np.int64)))


def self_block_count(steps: int, samples_per_step: int, mixed: bool, self_tokens: int | None, seq_len: int) -> int:
    """Training blocks to generate: one per sample the run draws (half when mixed), or --self-tokens' worth."""
    if self_tokens is not None:
        return max(1, math.ceil(self_tokens / seq_len))
    samples = steps * samples_per_step
    return max(1, math.ceil(samples / 2) if mixed else samples)


def scoring_block_count(scored_steps: int, samples_per_step: int) -> int:
    """Blocks to sample for --calibration self: one per sample the ramp scores."""
    return max(1, scored_steps * samples_per_step)


def generate_text(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, n_train: int, n_validation: int,
                  seq_len: int, seed: int, user_ids: np.ndarray | None = None,
                  progress: bool = True, prefix: list[int] | None = None) -> GeneratedText:
    """Sample n_train + n_validation blocks of seq_len tokens from the model, seeded and batched.

    Every sequence starts with ``prefix`` (default: ``prompt_prefix``, a chat turn's opening).
    """
    prefix = prompt_prefix(tokenizer) if prefix is None else prefix
    prompt_len = len(prefix) + (PROMPT_TOKENS if user_ids is not None else 0)
    if prompt_len >= seq_len:
        raise LoraPruneError(f"--seq-len {seq_len} leaves no room to generate after a {prompt_len}-token prompt; "
                             "use a larger --seq-len")
    if user_ids is not None and len(user_ids) <= PROMPT_TOKENS:
        raise LoraPruneError(f"the training text has {len(user_ids)} tokens, too few to draw prompts from")
    total = n_train + n_validation
    settings = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                max_new_tokens=seq_len - prompt_len, min_new_tokens=seq_len - prompt_len,
                                eos_token_id=None, pad_token_id=tokenizer.pad_token_id or 0)
    device = next(model.parameters()).device
    blocks = []
    with torch.random.fork_rng(devices=[]), torch.inference_mode():
        generator = torch.Generator().manual_seed(seed * 7919 + 17)
        for first in tqdm(range(0, total, GENERATION_BATCH), desc="generating self text", unit="batch",
                          disable=not progress):
            size = min(GENERATION_BATCH, total - first)
            prompts = _prompts(prefix, user_ids, size, generator).to(device)
            torch.manual_seed(seed * 7919 + first)
            blocks.append(model.generate(prompts, attention_mask=torch.ones_like(prompts),
                                         generation_config=settings).cpu())
    tokens = torch.cat(blocks)
    return GeneratedText(tokens[:n_train], tokens[n_train:])


def scoring_text(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, n_blocks: int, seq_len: int, seed: int,
                 progress: bool = True) -> torch.Tensor:
    """``--calibration self``: (n_blocks, seq_len) blocks sampled from BOS, seeded apart from the recovery text."""
    return generate_text(model, tokenizer, n_blocks, 0, seq_len, seed + 1, progress=progress,
                         prefix=unconditioned_prefix(tokenizer)).train


def prompt_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids every sampled recovery sequence starts with: the opening of a user turn, else BOS, else EOS."""
    if tokenizer.chat_template:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": _CONTENT_MARK}], tokenize=False)
        return tokenizer(rendered.split(_CONTENT_MARK)[0], add_special_tokens=False)["input_ids"]
    return unconditioned_prefix(tokenizer)


def unconditioned_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """BOS (else EOS): a start after which the model samples whatever it was trained on."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise LoraPruneError("text the model samples (--data self, --calibration self) needs a tokenizer with a "
                             "BOS or EOS token")
    return [start]


def _prompts(prefix: list[int], user_ids: np.ndarray | None, size: int, generator: torch.Generator) -> torch.Tensor:
    """(size, prompt_len) prompts: the prefix, then PROMPT_TOKENS user tokens from seeded positions."""
    prompts = torch.tensor(prefix, dtype=torch.long).repeat(size, 1)
    if user_ids is None:
        return prompts
    starts = torch.randint(0, len(user_ids) - PROMPT_TOKENS, (size,), generator=generator)
    drawn = torch.stack([torch.from_numpy(user_ids[s : s + PROMPT_TOKENS].astype(np.int64)) for s in starts.tolist()])
    return torch.cat([prompts, drawn], dim=1)

