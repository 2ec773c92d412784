"""Evaluation: perplexity by the paper's protocol, prefill/decode speed, and zero-shot tasks via lm-eval."""
