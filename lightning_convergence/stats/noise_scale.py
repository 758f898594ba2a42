"""Gradient noise scale and the unbiased two-batch-size estimators.

Paper: McCandlish, Kaplan, Amodei, OpenAI Dota Team. *An Empirical Model of Large-Batch Training.*
arXiv:1812.06162, 2018, Appendix A.

For a gradient ``G_B`` averaged over ``B`` i.i.d. examples with per-example covariance ``Σ``,
``E|G_B|² = |G|² + tr(Σ)/B``. Two measurements at batch sizes ``b_small < b_big`` therefore give the unbiased
estimates::

    |G|²  ≈ (b_big·|G_big|² − b_small·|G_small|²) / (b_big − b_small)
    tr(Σ) ≈ (|G_small|² − |G_big|²) / (1/b_small − 1/b_big)

and the simple noise scale ``B_simple = tr(Σ)/|G|²``. Both estimates are noisy, so the paper (and gpt-neox)
smooths numerator and denominator separately with an EMA and takes the ratio of the EMAs.

The two sizes come for free in data-parallel training: ``b_small`` is one rank's (or one micro-batch's) batch,
averaged over the ranks (or micro-batches), and ``b_big`` is the all-reduced (accumulated) batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from lightning_convergence._checks import check_number

__all__ = ["BiasCorrectedEMA", "GradientNoiseScale", "NoiseEstimate", "estimate_noise"]


@dataclass(frozen=True)
class NoiseEstimate:
    """One unbiased measurement: ``grad_sq_norm`` estimates ``|G|²`` and ``trace_cov`` estimates ``tr(Σ)``."""

    grad_sq_norm: float
    trace_cov: float

    @property
    def noise_scale(self) -> float:
        """``tr(Σ)/|G|²`` from this single measurement (``inf`` when ``|G|²`` is estimated as ≤ 0)."""
        return self.trace_cov / self.grad_sq_norm if self.grad_sq_norm > 0 else math.inf


def _to_float(x: float | Tensor) -> float:
    return float(x.detach().item()) if isinstance(x, Tensor) else float(x)


def estimate_noise(
    sq_norm_small: float | Tensor, sq_norm_big: float | Tensor, b_small: float, b_big: float
) -> NoiseEstimate:
    """Unbiased estimates of ``|G|²`` and ``tr(Σ)`` from squared gradient norms at two batch sizes.

    Args:
        sq_norm_small: ``|G_small|²``, the squared norm of a gradient averaged over ``b_small`` examples. When
            several small gradients are available (ranks, micro-batches), pass the *mean* of their squared norms:
            the estimator stays unbiased and its variance drops.
        sq_norm_big: ``|G_big|²``, the squared norm of the gradient averaged over ``b_big`` examples.
        b_small: the small batch size, > 0.
        b_big: the big batch size, > ``b_small``.

    Raises:
        ValueError: if ``b_small`` ≤ 0 or ``b_big`` ≤ ``b_small``.
    """
    if b_small <= 0 or b_big <= b_small:
        raise ValueError(
            f"estimate_noise: need 0 < `b_small` < `b_big`, got b_small={b_small}, b_big={b_big}."
        )
    s, g = _to_float(sq_norm_small), _to_float(sq_norm_big)
    grad_sq = (b_big * g - b_small * s) / (b_big - b_small)
    trace = (s - g) / (1.0 / b_small - 1.0 / b_big)
    return NoiseEstimate(grad_sq_norm=grad_sq, trace_cov=trace)


class BiasCorrectedEMA:
    """Exponential moving average with Adam-style bias correction.

    Args:
        beta: smoothing factor in [0, 1). Default ``0.99`` (gpt-neox's value for the noise scale); 0 keeps only
            the latest value. Larger values smooth more and react later.

    State: the raw average and the number of updates.
    """

    def __init__(self, beta: float = 0.99) -> None:
        self.beta = check_number("BiasCorrectedEMA", "beta", beta, 0, 1, high_open=True)
        self._avg = 0.0
        self._count = 0

    def update(self, value: float) -> float:
        """Add ``value`` and return the bias-corrected average."""
        self._avg = self.beta * self._avg + (1.0 - self.beta) * float(value)
        self._count += 1
        return self.value

    @property
    def value(self) -> float:
        """The bias-corrected average (``nan`` before the first update)."""
        if self._count == 0:
            return math.nan
        return self._avg / (1.0 - self.beta**self._count)

    @property
    def count(self) -> int:
        return self._count

    def state_dict(self) -> dict[str, float | int]:
        return {"avg": self._avg, "count": self._count}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self._avg = float(state["avg"])
        self._count = int(state["count"])


class GradientNoiseScale:
    """Tracks ``B_simple = tr(Σ)/|G|²`` as the ratio of two bias-corrected EMAs (McCandlish et al., App. A).

    Args:
        beta: EMA factor for numerator and denominator, in [0, 1). Default ``0.99``. Use smaller values (0.9)
            for short runs, where a 0.99 average would still be dominated by the first steps.

    State: both EMAs.
    """

    def __init__(self, beta: float = 0.99) -> None:
        self.trace_ema = BiasCorrectedEMA(beta)
        self.grad_sq_ema = BiasCorrectedEMA(beta)

    def update(self, estimate: NoiseEstimate) -> float:
        """Fold one measurement in; return the current ``B_simple``. Non-finite measurements are skipped."""
        if math.isfinite(estimate.trace_cov) and math.isfinite(estimate.grad_sq_norm):
            self.trace_ema.update(estimate.trace_cov)
            self.grad_sq_ema.update(estimate.grad_sq_norm)
        return self.noise_scale

    @property
    def noise_scale(self) -> float:
        """Current estimate of ``B_simple`` (``nan`` before any update, ``inf`` if ``|G|²`` EMA ≤ 0)."""
        g = self.grad_sq_ema.value
        if math.isnan(g):
            return math.nan
        return self.trace_ema.value / g if g > 0 else math.inf

    def state_dict(self) -> dict[str, dict[str, float | int]]:
        return {"trace": self.trace_ema.state_dict(), "grad_sq": self.grad_sq_ema.state_dict()}

    def load_state_dict(self, state: dict[str, dict[str, float | int]]) -> None:
        self.trace_ema.load_state_dict(state["trace"])
        self.grad_sq_ema.load_state_dict(state["grad_sq"])
