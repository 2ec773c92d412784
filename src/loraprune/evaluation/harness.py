"""Every quality run's side-by-side measures: in-domain and out-of-domain perplexity, fidelity to the
dense model on the out-of-domain text, and generation health.

Perplexity on the training corpus's own validation text rewards a model that forgot everything else;
the out-of-domain corpus is the built-in one the run did not train on (pydoc for Austen, Austen for
anything else), so a default cannot win by overfitting the recovery text.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from loraprune.data import load_text, token_blocks
from loraprune.errors import LoraPruneError
from loraprune.evaluation.fidelity import DenseView, fidelity
from loraprune.evaluation.generation import generation_health
from loraprune.evaluation.perplexity import perplexity

OUT_OF_DOMAIN = ("pydoc", "austen")  # the built-in corpora, in order of preference


def out_of_domain_data(train_data: str) -> str:
    """The built-in corpus the run's training data does not include ("austen+self" → "pydoc")."""
    used = set(train_data.split("+"))
    return next((name for name in OUT_OF_DOMAIN if name not in used), OUT_OF_DOMAIN[-1])


def out_of_domain_blocks(tokenizer, train_data: str, seq_len: int, max_tokens: int | None,
                         austen_dir: str | Path | None = None) -> tuple[str, torch.Tensor] | None:
    """(corpus name, validation blocks) of the out-of-domain text, or None when it is not on this machine."""
    name = out_of_domain_data(train_data)
    try:
        text = load_text(name, "validation", austen_dir)
    except LoraPruneError:  # e.g. no Austen novels here: the run still works, without this measure
        return None
    return name, token_blocks(tokenizer, text, seq_len, max_tokens)


def out_of_domain_report(model: nn.Module, tokenizer, ood: tuple[str, torch.Tensor] | None,
                         dense: DenseView | None = None, fidelity_windows: int | None = None,
                         with_generation: bool = True) -> dict:
    """Perplexity on the out-of-domain blocks, fidelity to ``dense`` on the first ``fidelity_windows``
    of them (all when None), and generation health."""
    report: dict = {}
    if ood is not None:
        name, blocks = ood
        result = perplexity(model, blocks, progress=False)
        result.data, result.split = name, "validation"
        report["perplexity"] = result.to_dict()
        if dense is not None:
            agreement = fidelity(model, blocks[: max(1, fidelity_windows or len(blocks))], dense)
            agreement.data, agreement.split = name, "validation"
            report["fidelity"] = agreement.to_dict()
    if with_generation:
        report["generation"] = generation_health(model, tokenizer).to_dict()
    return report
