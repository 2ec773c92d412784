"""Does the exported model compute what the masked model computed? Compare logits on a probe.

A float result is never bit-exact after slicing (matrix products sum in another order), so the
limit is not a constant: it is measured on the model itself, as the logit change that rounding
every linear layer's output to its dtype's precision causes (the noise floor), times a margin.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from loraprune.errors import LoraPruneError

# Slicing only reorders sums, so it stays within a few roundings of the floor; a slicing bug
# (a wrong head or channel kept) moves logits by orders of magnitude more (see the tests).
NOISE_MARGIN = 10.0
# The exported model's top-1 agreement with the trained one may fall this far below what rounding
# alone gives; a model that is not the trained one falls much further (a wrong merge: to 0).
TOP1_MARGIN = 0.1
PROBE_TOKENS = 16


class LogitCheckFailed(LoraPruneError):
    """The exported model does not compute what the masked model computed, beyond float rounding."""


@dataclass(frozen=True)
class LogitComparison:
    """How far two models' logits on the same tokens are apart."""

    relative_difference: float  # ‖a − b‖ / ‖b‖
    max_abs_difference: float
    top1_agreement: float  # share of positions whose argmax agrees

    def to_dict(self) -> dict[str, float]:
        """Plain JSON-ready dict."""
        return asdict(self)

    def describe(self) -> str:
        """One phrase for a message."""
        return (f"relative difference {self.relative_difference:.2e}, max |Δlogit| {self.max_abs_difference:.2e}, "
                f"top-1 agreement {self.top1_agreement:.3f}")


def compare_logits(actual: torch.Tensor, expected: torch.Tensor) -> LogitComparison:
    """Compare two (batch, tokens, vocabulary) logit tensors in float64."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    relative = float((actual - expected).norm() / expected.norm().clamp_min(1e-30))
    agreement = float((actual.argmax(-1) == expected.argmax(-1)).double().mean())
    return LogitComparison(relative, float((actual - expected).abs().max()), agreement)


def probe_ids(vocab_size: int) -> torch.Tensor:
    """A short fixed token sequence to compare logits on, shape (1, PROBE_TOKENS)."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (1, PROBE_TOKENS), generator=generator)


@torch.inference_mode()
def logits_of(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of ``input_ids`` on the model's device, returned on the CPU in float32."""
    device = next(model.parameters()).device
    return model(input_ids=input_ids.to(device)).logits.float().cpu()


def rounding_noise_floor(model: nn.Module, input_ids: torch.Tensor, seed: int = 0,
                         reference: torch.Tensor | None = None) -> float:
    """Relative logit change when every nn.Linear output is perturbed by ±1 unit roundoff of its dtype."""
    return rounding_noise(model, input_ids, seed, reference).relative_difference


@torch.inference_mode()
def rounding_noise(model: nn.Module, input_ids: torch.Tensor, seed: int = 0,
                   reference: torch.Tensor | None = None) -> LogitComparison:
    """How far logits move when every nn.Linear output is perturbed by ±1 unit roundoff of its dtype.

    This is the difference float rounding alone can make on this model and input: an honest
    yardstick for "the same computation, summed in another order".
    """
    generator = torch.Generator().manual_seed(seed)

    def perturb(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        unit_roundoff = torch.finfo(output.dtype).eps / 2
        noise = torch.rand(output.shape, generator=generator).to(output.device, output.dtype) * 2 - 1
        return output + output * noise * unit_roundoff

    reference = reference if reference is not None else logits_of(model, input_ids)
    handles = [m.register_forward_hook(perturb) for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        perturbed = logits_of(model, input_ids)
    finally:
        for handle in handles:
            handle.remove()
    return compare_logits(perturbed, reference)


def trained_model_check(exported: torch.Tensor, trained: torch.Tensor, floors: dict[str, LogitComparison]) -> dict:
    """Does the exported model compute what the trained one (masked, adapters on) computed?

    Its logits must stay within NOISE_MARGIN × the largest floor and its top-1 agreement within
    TOP1_MARGIN of the lowest floor's. A floor is what a known rounding alone does (the trained
    model's arithmetic, a GGUF weight type), never the drift being checked.
    """
    if not torch.isfinite(exported).all():
        raise LoraPruneError("the exported model produces non-finite logits; check the run's "
                             "loss curve, or export in float32")
    result = compare_logits(exported, trained)
    noise_floor = max(floor.relative_difference for floor in floors.values())
    top1_floor = min(floor.top1_agreement for floor in floors.values()) - TOP1_MARGIN
    return {"exported": result.to_dict(),
            **{f"{name}_floor": floor.relative_difference for name, floor in floors.items()},
            "noise_floor": noise_floor, "tolerance": NOISE_MARGIN * noise_floor, "top1_floor": top1_floor,
            "passed": result.relative_difference <= NOISE_MARGIN * noise_floor and result.top1_agreement >= top1_floor}


def check_failure(what: str, check: dict, advice: str) -> str:
    """The message of a failed check: what differed, by how much, against which limit."""
    exported = check["exported"]
    return (f"{what} differ from the trained model's beyond rounding (relative difference "
            f"{exported['relative_difference']:.2e}, limit {check['tolerance']:.1e} = {NOISE_MARGIN:.0f}× the "
            f"measured noise floor; top-1 agreement {exported['top1_agreement']:.3f}, limit {check['top1_floor']:.3f}); "
            f"nothing was written. {advice}")
