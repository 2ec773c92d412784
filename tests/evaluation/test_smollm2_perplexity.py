"""The real SmolLM2-135M on Northanger Abbey: the perplexity the README and benchmarks rely on.

16,384 tokens in 512-token windows; we measured 32.9 with float32 weights dequantized from Q4_1.
"""

from __future__ import annotations

import pytest

from loraprune.evaluation.perplexity import evaluate_perplexity


@pytest.mark.slow
def test_smollm2_perplexity_on_northanger_abbey_is_in_the_expected_range(smollm2, austen_dir):
    model, tokenizer = smollm2
    result = evaluate_perplexity(
        model, tokenizer, "austen", seq_len=512, max_tokens=16384, austen_dir=austen_dir, progress=False
    )
    assert (result.n_windows, result.n_tokens) == (32, 32 * 511)
    assert 25 < result.ppl < 45, result
