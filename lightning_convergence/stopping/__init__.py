"""Convergence-aware early stopping cores (torch only, never ``lightning``): GradES per-matrix freezing, the
norm-test "signal below the dataset's noise" rule and the LR-annealing loss-curve rule."""

from lightning_convergence.stopping.grades import GradES
from lightning_convergence.stopping.loss_curve import LossCurveRule, LRAreas, ScalingLawFit, fit_scaling_law
from lightning_convergence.stopping.lr_forecast import forecast_lrs
from lightning_convergence.stopping.statistical import NoiseDominatedRule

__all__ = [
    "GradES",
    "LRAreas",
    "LossCurveRule",
    "NoiseDominatedRule",
    "ScalingLawFit",
    "fit_scaling_law",
    "forecast_lrs",
]
