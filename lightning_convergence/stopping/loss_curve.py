"""Predict the rest of a loss curve from the LR-annealing scaling law, fitted online (pure core; no ``lightning``).

Paper: Tissue, Wang, Wang, Liu, Liu (2024). *Scaling Law with Learning Rate Annealing.* arXiv:2408.11029::

    L(s) = L0 + A · S1(s)^(−α) − C · S2(s)
    S1(s) = Σ_{i≤s} η_i                                   (forward area: the sum of learning rates so far)
    S2(s) = Σ_{i≤s} m_i,  m_i = λ · m_{i−1} + (η_{i−1} − η_i)   (annealing area with momentum λ; paper λ ≈ 0.999)

Given the recorded ``(S1, S2, loss)`` triples, :func:`fit_scaling_law` finds ``(L0, A, α, C)`` by variable
projection: for a fixed α the model is linear in ``(L0, A, C)`` (solved exactly by least squares on *relative*
residuals ``(L̂ − L)/L``, so the early large losses do not dominate, with ``A, C ≥ 0``), and α is found by a
log-spaced grid followed by golden-section refinement. This needs neither scipy nor a starting guess, and is
deterministic. :meth:`LRAreas.project` carries the areas forward over a planned LR sequence, so the loss at the
end of the budget can be predicted under the current schedule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lightning_convergence._checks import argument_error, check_int_at_least, check_number, check_state_version

__all__ = ["LRAreas", "ScalingLawFit", "fit_scaling_law", "LossCurveRule"]

_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


class LRAreas:
    """Online forward area ``S1`` and annealing area ``S2`` of the learning rates applied so far.

    Args:
        decay: λ, the momentum of the annealing area, in [0, 1). Default ``0.999`` (the paper's value); 0 makes
            ``S2 = η_0 − η_s``, the plain LR drop.

    State: ``s1``, ``s2``, ``momentum``, ``prev_lr``, ``steps``.
    """

    def __init__(self, decay: float = 0.999) -> None:
        self.decay = check_number("LRAreas", "decay", decay, 0, 1, high_open=True)
        self.s1 = 0.0
        self.s2 = 0.0
        self.momentum = 0.0
        self.prev_lr: float | None = None
        self.steps = 0

    def step(self, lr: float) -> None:
        """Account for one optimizer step taken at learning rate ``lr``."""
        lr = float(lr)
        drop = 0.0 if self.prev_lr is None else self.prev_lr - lr
        self.momentum = self.decay * self.momentum + drop
        self.s2 += self.momentum
        self.s1 += lr
        self.prev_lr = lr
        self.steps += 1

    def project(self, future_lrs: Sequence[float]) -> tuple[float, float]:
        """``(S1, S2)`` after further steps at ``future_lrs``, in closed form (vectorised; state unchanged)."""
        k = len(future_lrs)
        if k == 0:
            return self.s1, self.s2
        lrs = torch.tensor([float(x) for x in future_lrs], dtype=torch.float64)
        prev = torch.cat([torch.tensor([self.prev_lr if self.prev_lr is not None else float(lrs[0])],
                                       dtype=torch.float64), lrs[:-1]])
        drops = prev - lrs
        lam = self.decay
        j = torch.arange(1, k + 1, dtype=torch.float64)
        if lam == 0.0:
            weights = torch.ones(k, dtype=torch.float64)
            carry = 0.0
        else:
            # Σ_{i=1..k} m_i = m_0 Σ_i λ^i + Σ_j d_j Σ_{i=j..k} λ^{i−j}
            weights = (1.0 - lam ** (k - j + 1)) / (1.0 - lam)
            carry = self.momentum * lam * (1.0 - lam**k) / (1.0 - lam)
        return self.s1 + float(lrs.sum()), self.s2 + carry + float((weights * drops).sum())

    def state_dict(self) -> dict[str, Any]:
        return {"s1": self.s1, "s2": self.s2, "momentum": self.momentum, "prev_lr": self.prev_lr,
                "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.s1, self.s2 = float(state["s1"]), float(state["s2"])
        self.momentum = float(state["momentum"])
        self.prev_lr = None if state["prev_lr"] is None else float(state["prev_lr"])
        self.steps = int(state["steps"])


@dataclass(frozen=True)
class ScalingLawFit:
    """Fitted ``L(S1, S2) = l0 + a·S1^(−alpha) − c·S2`` and its root-mean-square relative residual."""

    l0: float
    a: float
    alpha: float
    c: float
    rmse: float

    def predict(self, s1: float, s2: float) -> float:
        return self.l0 + self.a * max(s1, 1e-300) ** (-self.alpha) - self.c * s2


def _solve_linear(s1: torch.Tensor, s2: torch.Tensor, y: torch.Tensor, alpha: float, use_s2: bool):
    """Weighted (relative-error) least squares for ``(L0, A, C)`` at fixed α, with ``A ≥ 0`` and ``C ≥ 0`` enforced
    by dropping a term whose unconstrained coefficient is negative (a tiny active-set method)."""
    w = 1.0 / y.abs().clamp_min(1e-12)
    cols = {"l0": torch.ones_like(s1), "a": s1.pow(-alpha)}
    if use_s2:
        cols["c"] = -s2
    while True:
        names = list(cols)
        x = torch.stack([cols[n] for n in names], dim=1)
        scale = x.abs().amax(dim=0).clamp_min(1e-300)
        sol = torch.linalg.lstsq((x * w[:, None]) / scale, (y * w).unsqueeze(1), driver="gelsd").solution
        coef = sol.squeeze(1) / scale
        negative = [n for n, c in zip(names, coef.tolist()) if n != "l0" and c < 0]
        if not negative:
            break
        del cols[negative[0]]
    full = {n: float(c) for n, c in zip(names, coef.tolist())}
    rss = float(((x @ coef - y) * w).pow(2).sum())
    return torch.tensor([full.get("l0", 0.0), full.get("a", 0.0), full.get("c", 0.0)], dtype=torch.float64), rss


def fit_scaling_law(
    s1: Sequence[float], s2: Sequence[float], loss: Sequence[float], alpha_bounds: tuple[float, float] = (0.01, 3.0)
) -> ScalingLawFit:
    """Least-squares fit of the LR-annealing scaling law by variable projection (see module docstring).

    Args:
        s1, s2, loss: equal-length records; points with ``S1`` ≤ 0 or a non-finite loss are dropped.
        alpha_bounds: the search interval for α, ``0 < low < high``.

    Raises:
        ValueError: if fewer than 4 usable points remain (3 when ``S2`` is constant), or bad ``alpha_bounds``.
    """
    lo, hi = (float(b) for b in alpha_bounds)
    if not 0.0 < lo < hi:
        raise argument_error("fit_scaling_law", "alpha_bounds", "(low, high) with 0 < low < high", alpha_bounds)
    t1, t2, ty = (torch.tensor([float(v) for v in seq], dtype=torch.float64) for seq in (s1, s2, loss))
    keep = (t1 > 0) & torch.isfinite(ty) & torch.isfinite(t2)
    t1, t2, ty = t1[keep], t2[keep], ty[keep]
    use_s2 = bool(t2.numel() > 0 and (t2.max() - t2.min()) > 1e-12 * max(1.0, float(t2.abs().max())))
    need = 4 if use_s2 else 3
    if t1.numel() < need:
        raise ValueError(f"fit_scaling_law: need at least {need} points with S1 > 0, got {int(t1.numel())}.")

    def rss(alpha: float) -> float:
        return _solve_linear(t1, t2, ty, alpha, use_s2)[1]

    grid = torch.logspace(math.log10(lo), math.log10(hi), 41, dtype=torch.float64).tolist()
    errs = [rss(a) for a in grid]
    i = min(range(len(grid)), key=errs.__getitem__)
    a_lo, a_hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    # Golden-section search on the bracket around the best grid point (RSS is smooth in α there).
    x1, x2 = a_hi - _GOLDEN * (a_hi - a_lo), a_lo + _GOLDEN * (a_hi - a_lo)
    f1, f2 = rss(x1), rss(x2)
    for _ in range(40):
        if f1 < f2:
            a_hi, x2, f2 = x2, x1, f1
            x1 = a_hi - _GOLDEN * (a_hi - a_lo)
            f1 = rss(x1)
        else:
            a_lo, x1, f1 = x1, x2, f2
            x2 = a_lo + _GOLDEN * (a_hi - a_lo)
            f2 = rss(x2)
    candidates = [(errs[i], grid[i]), (f1, x1), (f2, x2)]
    _, alpha = min(candidates)
    coef, best = _solve_linear(t1, t2, ty, alpha, use_s2)
    return ScalingLawFit(float(coef[0]), float(coef[1]), float(alpha), float(coef[2]), math.sqrt(best / t1.numel()))


class LossCurveRule:
    """Fire when the fitted scaling law predicts less than ``min_delta`` further improvement by the end of the
    budget, for ``patience`` consecutive checks.

    Paper: Tissue et al., *Scaling Law with Learning Rate Annealing*, arXiv:2408.11029 (Eq. 1 and the S1/S2
    definitions; see the module docstring).

    Deviations: the paper fits the law offline on complete curves; here it is fitted online by least squares on
    relative residuals (with ``A, C ≥ 0``) to the losses averaged between checks, and only used to extrapolate the
    current run to its own budget. The improvement is measured between two points of the *fitted* curve (now and at the
    end), so the per-step noise of the observed loss does not enter it.

    Args:
        min_delta: stop when the predicted improvement is below this (loss units), ≥ 0. Like ``EarlyStopping``'s
            ``min_delta``; set it to the smallest gain worth the remaining compute.
        patience: consecutive firing checks needed, ≥ 1. Default ``3``.
        min_step: never fire before this optimizer step, ≥ 0. Default ``0``.
        min_points: recorded points needed before the first fit, ≥ 4. Default ``8``.
        decay: λ of the annealing area, in [0, 1). Default ``0.999``.

    State: the LR areas, the recorded history ``(step, S1, S2, loss)``, streak, last fit and prediction.

    Raises:
        ValueError: for ``min_delta`` < 0, ``patience`` < 1, ``min_step`` < 0, ``min_points`` < 4 or ``decay``
            outside [0, 1).

    Example::

        rule = LossCurveRule(min_delta=0.01)
        rule.areas.step(lr); rule.record(step, mean_loss)
        fired = rule.check(step, future_lrs=[lr] * remaining)
    """

    STATE_VERSION = 1

    def __init__(
        self, min_delta: float, patience: int = 3, min_step: int = 0, min_points: int = 8, decay: float = 0.999
    ) -> None:
        validate_curve_args("LossCurveRule", min_delta, patience, min_step, min_points)
        self.min_delta = float(min_delta)
        self.patience = int(patience)
        self.min_step = int(min_step)
        self.min_points = int(min_points)
        self.areas = LRAreas(decay)
        self.history: list[tuple[int, float, float, float]] = []
        self.streak = 0
        self.last_fit: ScalingLawFit | None = None
        self.predicted_improvement = math.nan
        self.predicted_final_loss = math.nan

    def record(self, step: int, loss: float) -> None:
        """Record the loss observed at the current areas (non-finite losses are dropped)."""
        if math.isfinite(loss) and self.areas.s1 > 0:
            self.history.append((int(step), self.areas.s1, self.areas.s2, float(loss)))

    def check(self, step: int, future_lrs: Sequence[float]) -> bool:
        """Refit and predict the gain from now to the end of ``future_lrs``; True when the rule fires."""
        if len(self.history) < self.min_points:
            return False
        _, s1, s2, loss = zip(*self.history)
        try:
            fit = fit_scaling_law(s1, s2, loss)
        except ValueError:
            return False
        self.last_fit = fit
        s1_end, s2_end = self.areas.project(future_lrs)
        now = fit.predict(self.areas.s1, self.areas.s2)
        self.predicted_final_loss = fit.predict(s1_end, s2_end)
        self.predicted_improvement = now - self.predicted_final_loss
        self.streak = self.streak + 1 if self.predicted_improvement < self.min_delta else 0
        return step >= self.min_step and self.streak >= self.patience

    def state_dict(self) -> dict[str, Any]:
        fit = None if self.last_fit is None else [
            self.last_fit.l0, self.last_fit.a, self.last_fit.alpha, self.last_fit.c, self.last_fit.rmse]
        return {
            "version": self.STATE_VERSION, "areas": self.areas.state_dict(),
            "history": [list(h) for h in self.history], "streak": self.streak, "last_fit": fit,
            "predicted_improvement": self.predicted_improvement, "predicted_final_loss": self.predicted_final_loss,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_version(type(self).__name__, state, self.STATE_VERSION)
        self.areas.load_state_dict(state["areas"])
        self.history = [(int(h[0]), float(h[1]), float(h[2]), float(h[3])) for h in state["history"]]
        self.streak = int(state["streak"])
        self.last_fit = None if state["last_fit"] is None else ScalingLawFit(*map(float, state["last_fit"]))
        self.predicted_improvement = float(state["predicted_improvement"])
        self.predicted_final_loss = float(state["predicted_final_loss"])


def validate_curve_args(owner: str, min_delta: float, patience: int, min_step: int, min_points: int) -> None:
    """Shared validation for the core and the callback (errors name ``owner``)."""
    check_number(owner, "min_delta", min_delta, 0)
    check_int_at_least(owner, "patience", patience, 1)
    check_int_at_least(owner, "min_step", min_step, 0)
    check_int_at_least(owner, "min_points", min_points, 4)
