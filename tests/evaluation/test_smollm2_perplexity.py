"""The real SmolLM2-135M on Northanger Abbey: the converted weights predict real text as they should.

The first 4,096 tokens in 512-token windows give 38.5 with float32 weights dequantized from Q4_1 (the
README's 32.9 is on 16,384 tokens; the quality suite's 33.66 on 8,192); a broken conversion gives thousands.
"""

from __future__ import annotations

import pytest

from loraprune.evaluation.perplexity import evaluate_perplexity


@pytest.mark.slow
def test_smollm2_perplexity_on_northanger_abbey_is_in_the_expected_range(smollm2, austen_dir):
    model, tokenizer = smollm2
    result = evaluate_perplexity(
        model, tokenizer, "austen", seq_len=512, max_tokens=4096, austen_dir=austen_dir, progress=False
    )
    assert (result.n_windows, result.n_tokens) == (8, 8 * 511)
    assert 30 < result.ppl < 45, result
