"""Stop when the gradient signal is below its noise for the whole dataset (the pure core; no ``lightning``).

Paper: Lau, Liu, Kolar. *AdAdaGrad: Adaptive Batch Size Schemes for Adaptive Gradient Methods.*
arXiv:2402.11215, 2024 (the norm test); Byrd, Chin, Nocedal, Wu, *Sample size selection in optimization methods
for machine learning*, Math. Program. 2012 (its origin).

The norm test asks for the batch size ``b`` at which a mini-batch gradient is a good enough descent direction::

    b_req = tr(Σ) / (η² ‖g‖²)          (Σ: per-example gradient covariance, g: the mean gradient)

If ``b_req`` exceeds the number of examples ``N`` in the dataset, not even the full dataset resolves the gradient
to relative error η: the remaining signal is smaller than the statistical noise of the data itself, and further
optimisation fits that noise. With ``η = 1`` this reads ``‖g‖² < tr(Σ)/N``: the gradient norm is below the
standard error of the dataset-mean gradient, which on least squares is exactly when the optimisation error has
reached the estimation error of the minimiser.
"""

from __future__ import annotations

import math
from typing import Any

from lightning_convergence._checks import check_int_at_least, check_number, check_state_version
from lightning_convergence.stats.batch_tests import norm_test_batch_size
from lightning_convergence.stats.variance import SampleGradStats

__all__ = ["NoiseDominatedRule"]


class NoiseDominatedRule:
    """Fire after ``patience`` consecutive checks (from ``min_step`` on) at which the norm test, on the estimates
    averaged over the last ``window`` measurements, demands more than ``dataset_size`` examples *with confidence*:
    even the upper confidence bound of ``‖g‖²`` is below ``tr(Σ)/(η² N)``.

    Paper: Lau, Liu, Kolar, *AdAdaGrad*, arXiv:2402.11215 (norm test, Sec. 3; official code ``norm_test``).

    Deviations: AdAdaGrad uses the test to *grow* the batch; here its verdict "larger than the dataset" is the
    stopping signal. ``tr(Σ)`` and ``‖g‖²`` are unbiased micro-batch / per-rank estimates (McCandlish et al.'s
    estimator), not exact per-example gradients. Near convergence a single ``‖g‖²`` estimate is far noisier than
    the threshold ``tr(Σ)/N`` it is compared with (its noise scales like ``tr(Σ)/b`` for batch ``b ≪ N``), so
    the rule averages a sliding window of measurements and requires ``mean + z·stderr`` of ``‖g‖²`` to be below
    the threshold: with too little data it does not fire, rather than firing on noise.

    Args:
        dataset_size: N, training examples in one epoch (all ranks together), ≥ 2.
        eta: η, the relative error the norm test tolerates, > 0. Default ``1.0`` (signal below its dataset noise);
            AdAdaGrad's batch-growth default is 0.1. Smaller η stops earlier (η² N is the noise-scale threshold).
        patience: consecutive firing checks needed, ≥ 1. Default ``3``.
        min_step: never fire before this optimizer step, ≥ 0. Default ``0``.
        window: measurements averaged, ≥ 2. Default ``10``. Larger resolves smaller gradients (the standard error
            falls like 1/√window) but reacts later.
        confidence_z: z of the one-sided upper bound ``mean + z·stderr`` on ``‖g‖²``, ≥ 0. Default ``2.0``; 0
            compares the window mean alone.

    State: the window of ``(tr Σ, ‖g‖²)`` estimates, the streak, the number of checks, the last required batch,
    ``version``.

    Raises:
        ValueError: for ``dataset_size`` < 2, ``eta`` ≤ 0, ``patience`` < 1, ``min_step`` < 0, ``window`` < 2 or
            ``confidence_z`` < 0.

    Example::

        rule = NoiseDominatedRule(dataset_size=50_000, eta=1.0, patience=3)
        fired = rule.update(step, trace_cov=estimate.trace_cov, grad_sq_norm=estimate.grad_sq_norm)
    """

    STATE_VERSION = 2

    def __init__(
        self, dataset_size: int, eta: float = 1.0, patience: int = 3, min_step: int = 0, window: int = 10,
        confidence_z: float = 2.0,
    ) -> None:
        check_int_at_least("NoiseDominatedRule", "dataset_size", dataset_size, 2)
        validate_noise_args("NoiseDominatedRule", eta, patience, min_step, window, confidence_z)
        self.dataset_size = dataset_size
        self.eta = float(eta)
        self.patience = int(patience)
        self.min_step = int(min_step)
        self.window = int(window)
        self.confidence_z = float(confidence_z)
        self.samples: list[tuple[float, float]] = []
        self.streak = 0
        self.checks = 0
        self.last_required_batch = math.nan
        self.last_grad_sq_upper = math.nan

    def update(self, step: int, trace_cov: float, grad_sq_norm: float) -> bool:
        """Fold one measurement in; True when the rule fires. Non-finite estimates are skipped (not added)."""
        self.checks += 1
        if math.isfinite(trace_cov) and math.isfinite(grad_sq_norm):
            self.samples = [*self.samples, (float(trace_cov), float(grad_sq_norm))][-self.window:]
        k = len(self.samples)
        if k < self.window:
            self.streak = 0
            return False
        trace = sum(t for t, _ in self.samples) / k
        g2 = sum(g for _, g in self.samples) / k
        var = sum((g - g2) ** 2 for _, g in self.samples) / (k - 1)
        upper = g2 + self.confidence_z * math.sqrt(var / k)
        # The norm test's demanded batch, from the one implementation in the stats core (for logging).
        window_stats = SampleGradStats(count=k, trace_cov=trace, grad_sq_norm=g2, inner_var=0.0)
        self.last_required_batch = norm_test_batch_size(window_stats, self.eta)
        self.last_grad_sq_upper = upper
        noise_dominated = trace > 0 and upper * self.eta**2 * self.dataset_size < trace
        self.streak = self.streak + 1 if noise_dominated else 0
        return step >= self.min_step and self.streak >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": self.STATE_VERSION, "samples": [list(x) for x in self.samples], "streak": self.streak,
            "checks": self.checks, "last_required_batch": self.last_required_batch,
            "last_grad_sq_upper": self.last_grad_sq_upper,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_version(type(self).__name__, state, self.STATE_VERSION)
        self.samples = [(float(t), float(g)) for t, g in state["samples"]][-self.window:]
        self.streak = int(state["streak"])
        self.checks = int(state["checks"])
        self.last_required_batch = float(state["last_required_batch"])
        self.last_grad_sq_upper = float(state["last_grad_sq_upper"])


def validate_noise_args(
    owner: str, eta: float, patience: int, min_step: int, window: int = 2, confidence_z: float = 0.0
) -> None:
    """Shared validation for the core and the callback (errors name ``owner``)."""
    check_number(owner, "eta", eta, 0, low_open=True)
    check_int_at_least(owner, "patience", patience, 1)
    check_int_at_least(owner, "min_step", min_step, 0)
    check_int_at_least(owner, "window", window, 2)
    check_number(owner, "confidence_z", confidence_z, 0)
