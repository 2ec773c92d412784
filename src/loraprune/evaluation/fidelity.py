"""Fidelity of a pruned model to its dense base: KL(dense ‖ pruned) per token and top-1 agreement.

The dense logits come from the same model with its adapters disabled and masks suspended (as the
distillation teacher's), one window at a time, so the two models are never held side by side.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import asdict, dataclass

import torch
from torch import nn

from loraprune.errors import LoraPruneError

DenseView = Callable[[], AbstractContextManager]  # inside it the model computes the dense logits


@dataclass
class FidelityResult:
    """Mean KL(dense ‖ pruned) in nats per predicted token and the share of equal argmax tokens."""

    kl: float
    top1_agreement: float
    n_tokens: int
    seq_len: int
    n_windows: int
    seconds: float
    data: str | None = None
    split: str | None = None

    def to_dict(self) -> dict:
        """A JSON-ready dict of all fields."""
        return asdict(self)


def dense_view(model: nn.Module, masks=None) -> DenseView:
    """A context factory under which ``model`` (PEFT-wrapped and/or masked) is its dense base."""
    def view() -> AbstractContextManager:
        stack = ExitStack()
        if hasattr(model, "disable_adapter"):
            stack.enter_context(model.disable_adapter())
        if masks is not None:
            stack.enter_context(masks.suspended())
        return stack
    return view


def kl_and_agreement(dense_logits: torch.Tensor, pruned_logits: torch.Tensor) -> tuple[float, int]:
    """(summed KL(dense ‖ pruned) over positions, count of positions whose argmax tokens agree)."""
    log_p = torch.log_softmax(dense_logits.float(), dim=-1)
    log_q = torch.log_softmax(pruned_logits.float(), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum().item()
    agree = int((dense_logits.argmax(-1) == pruned_logits.argmax(-1)).sum())
    return kl, agree


@torch.inference_mode()
def fidelity(model: nn.Module, blocks: torch.Tensor, dense: DenseView = nullcontext) -> FidelityResult:
    """KL(dense ‖ model) and top-1 agreement over (n_windows, seq_len) blocks, window by window."""
    if blocks.ndim != 2 or blocks.shape[0] == 0 or blocks.shape[1] < 2:
        raise LoraPruneError(f"fidelity needs blocks of shape (n_windows >= 1, seq_len >= 2), got {tuple(blocks.shape)}")
    device = next(model.parameters()).device
    total_kl, total_agree = 0.0, 0
    started = time.perf_counter()
    for window in blocks:
        ids = window[None].to(device)
        with dense():
            dense_logits = model(input_ids=ids, use_cache=False).logits[0, :-1]
        pruned_logits = model(input_ids=ids, use_cache=False).logits[0, :-1]
        kl, agree = kl_and_agreement(dense_logits, pruned_logits)
        total_kl, total_agree = total_kl + kl, total_agree + agree
    n_windows, seq_len = blocks.shape
    n_tokens = n_windows * (seq_len - 1)
    return FidelityResult(kl=max(total_kl / n_tokens, 0.0), top1_agreement=total_agree / n_tokens,
                          n_tokens=n_tokens, seq_len=seq_len, n_windows=n_windows,
                          seconds=time.perf_counter() - started)
