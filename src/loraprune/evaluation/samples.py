"""Greedy continuations of a few fixed prompts: a quick look at whether a model still writes English."""

from __future__ import annotations

import torch
from torch import nn

SAMPLE_PROMPTS = (
    "The capital of France is",
    "It is a truth universally acknowledged, that",
    "To read a file line by line in Python,",
)
SAMPLE_TOKENS = 24


@torch.inference_mode()
def greedy_samples(model: nn.Module, tokenizer, prompts: tuple[str, ...] = SAMPLE_PROMPTS,
                   new_tokens: int = SAMPLE_TOKENS, repetition_penalty: float | None = None) -> list[str]:
    """The greedy continuation of each prompt (the new text only), one prompt at a time; ``repetition_penalty``
    None decodes as the model's generation config says."""
    device = next(model.parameters()).device
    options = {} if repetition_penalty is None else {"repetition_penalty": repetition_penalty}
    continuations = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
        output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                                **options)
        continuations.append(tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True))
    return continuations
