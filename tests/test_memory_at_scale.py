"""The LLaMA-7B-shape memory benchmark's arithmetic: per-layer slope, extrapolation, docs text."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from memory_at_scale import EXTRAPOLATE_TO, extrapolate, ratios, step_time_ratios
from memory_at_scale_docs import section


def _row(mode: str, layers: int, per_layer_gb: float, step: float) -> dict:
    peak = int((3 + per_layer_gb * layers) * 1e9)
    return {"mode": mode, "layers": layers, "dtype": "float32", "base_bits": None, "seq_len": 128, "steps": 3,
            "rss_after_load_bytes": int(2e9), "peak_rss_bytes": peak, "training_increase_bytes": peak - int(2e9),
            "step_seconds_median": step * layers, "frozen_bytes": 0, "lora_parameter_bytes": 0,
            "lora_gradient_bytes": 0, "adamw_state_bytes": 0,
            "weight_gradient_bytes": int(0.8e9 * layers) if mode == "grad" else 0}


def test_extrapolation_follows_the_per_layer_slope_to_32_layers():
    rows = [_row(mode, layers, gb, step) for mode, gb, step in (("lora", 0.8, 1.0), ("grad", 1.6, 2.0))
            for layers in (2, 4)]
    fits = extrapolate(rows)
    assert fits["grad"]["peak_rss_bytes_per_layer"] == pytest.approx(1.6e9)
    assert fits["lora"][f"peak_rss_bytes_at_{EXTRAPOLATE_TO}"] == pytest.approx((3 + 0.8 * 32) * 1e9)
    memory = ratios(fits)["lora_vs_grad"]["peak_rss_bytes"]
    assert memory == pytest.approx((3 + 0.8 * 32) / (3 + 1.6 * 32))
    assert step_time_ratios(rows)["lora_vs_grad"] == pytest.approx(0.5)
    text = section({"rows": rows, "extrapolated": fits, "ratios_at_32_layers": ratios(fits),
                    "step_time_ratios_at_4_layers": step_time_ratios(rows)}, "cmd", "machine")
    assert f"lora vs grad: peak memory {memory:.3f}×" in text and "missed" in text
