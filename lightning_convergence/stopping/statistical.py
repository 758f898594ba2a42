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

__all__ = ["NoiseDominatedRule", "norm_test_batch_size"]


def norm_test_batch_size(trace_cov: float, grad_sq_norm: float, eta: float) -> float:
    """``tr(Σ)/(η²‖g‖²)``, the norm test's required batch (``inf`` when ``‖g‖²`` ≤ 0, ``nan`` for nan input)."""
    if math.isnan(trace_cov) or math.isnan(grad_sq_norm):
        return math.nan
    if grad_sq_norm <= 0:
        return math.inf
    return max(trace_cov, 0.0) / (eta * eta * grad_sq_norm)


class NoiseDominatedRule:
    """Fire after ``patience`` consecutive checks (from ``min_step`` on) at which the norm test demands more than
    ``dataset_size`` examples.

    Paper: Lau, Liu, Kolar, *AdAdaGrad*, arXiv:2402.11215 (norm test, Sec. 3; official code ``norm_test``).

    Deviations: AdAdaGrad uses the test to *grow* the batch; here its verdict "larger than the dataset" is the
    stopping signal. ``tr(Σ)`` and ``‖g‖²`` are expected as smoothed (EMA) unbiased estimates from micro-batch or
    per-rank gradients (McCandlish et al.'s estimator), not from exact per-example gradients.

    Args:
        dataset_size: N, training examples in one epoch (all ranks together), ≥ 2.
        eta: η, the relative error the norm test tolerates, > 0. Default ``1.0`` (signal below its dataset noise);
            AdAdaGrad's batch-growth default is 0.1. Smaller η stops earlier (η² N is the noise-scale threshold).
        patience: consecutive firing checks needed, ≥ 1. Default ``3``. Raise it when estimates are noisy.
        min_step: never fire before this optimizer step, ≥ 0. Default ``0``.

    State: the current streak, the number of checks, the last required batch, and ``version``.

    Raises:
        ValueError: for ``dataset_size`` < 2, ``eta`` ≤ 0, ``patience`` < 1 or ``min_step`` < 0.

    Example::

        rule = NoiseDominatedRule(dataset_size=50_000, eta=1.0, patience=3)
        fired = rule.update(step, trace_cov=tracker.trace_ema.value, grad_sq_norm=tracker.grad_sq_ema.value)
    """

    STATE_VERSION = 1

    def __init__(self, dataset_size: int, eta: float = 1.0, patience: int = 3, min_step: int = 0) -> None:
        if isinstance(dataset_size, bool) or not isinstance(dataset_size, int) or dataset_size < 2:
            raise ValueError(f"NoiseDominatedRule: `dataset_size` must be an int >= 2, got {dataset_size!r}.")
        validate_noise_args("NoiseDominatedRule", eta, patience, min_step)
        self.dataset_size = dataset_size
        self.eta = float(eta)
        self.patience = int(patience)
        self.min_step = int(min_step)
        self.streak = 0
        self.checks = 0
        self.last_required_batch = math.nan

    def update(self, step: int, trace_cov: float, grad_sq_norm: float) -> bool:
        """Fold one check in; True when the rule fires. A ``nan`` estimate resets the streak."""
        self.checks += 1
        b_req = norm_test_batch_size(float(trace_cov), float(grad_sq_norm), self.eta)
        self.last_required_batch = b_req
        noise_dominated = not math.isnan(b_req) and b_req > self.dataset_size
        self.streak = self.streak + 1 if noise_dominated else 0
        return step >= self.min_step and self.streak >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": self.STATE_VERSION, "streak": self.streak, "checks": self.checks,
            "last_required_batch": self.last_required_batch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != self.STATE_VERSION:
            raise RuntimeError(
                f"NoiseDominatedRule: checkpoint state `version` {state.get('version')!r} is not "
                f"{self.STATE_VERSION}; it cannot be converted."
            )
        self.streak = int(state["streak"])
        self.checks = int(state["checks"])
        self.last_required_batch = float(state["last_required_batch"])


def validate_noise_args(owner: str, eta: float, patience: int, min_step: int) -> None:
    """Shared validation for the core and the callback (errors name ``owner``)."""
    if not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta <= 0:
        raise ValueError(f"{owner}: `eta` must be a finite number > 0, got {eta!r}.")
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
        raise ValueError(f"{owner}: `patience` must be an int >= 1, got {patience!r}.")
    if isinstance(min_step, bool) or not isinstance(min_step, int) or min_step < 0:
        raise ValueError(f"{owner}: `min_step` must be an int >= 0, got {min_step!r}.")
