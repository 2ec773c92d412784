"""LoRA set-up: what a quantised base can and cannot serve."""

from __future__ import annotations

import pytest


def test_a_criterion_a_quantised_base_cannot_serve_is_refused_in_plain_english():
    from loraprune.config import PruneConfig
    from loraprune.errors import LoraPruneError
    from loraprune.training.lora import check_base_precision

    with pytest.raises(LoraPruneError, match="which an 8-bit base cannot have"):
        check_base_precision(PruneConfig(base_bits=8, criterion="grad"))
    with pytest.raises(LoraPruneError, match="which a 4-bit base cannot have"):
        check_base_precision(PruneConfig(base_bits=4, criterion="grad"))
