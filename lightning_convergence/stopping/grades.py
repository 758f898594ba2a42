"""GradES: per-matrix convergence tracking and freezing (the pure core; no ``lightning`` import).

Paper: Wen et al. *GradES: Significantly Faster Training in Transformers with Gradient-Based Early Stopping.*
arXiv:2509.01842, 2025; official code ``IXZZZ9/GradES`` (``grades/gradient_early_stopping.py``).

Every ``check_every_n_steps`` optimizer steps, for each matrix ``c`` not yet frozen::

    signal_c = ‖∇_{W_c} L‖₁                      (signal="grad": the paper's abstract)
             = ‖W_c(t) − W_c(t_prev)‖₁            (signal="weight_change": the official code)
    if t ≥ floor(α · T) and signal_c < τ for `patience` consecutive checks:  freeze c (permanent)
    stop when #frozen / #matrices ≥ max_frozen_ratio

The first weight-change check only caches the weights: the official code returns 0.0 there, which with α = 0 would
freeze every matrix at once. Here that first check yields no signal and never freezes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_convergence import stats
from lightning_convergence._checks import (
    argument_error,
    check_choice,
    check_int_at_least,
    check_number,
    check_state_version,
)

__all__ = ["GradES", "SIGNALS", "REDUCTIONS"]

SIGNALS = ("weight_change", "grad")
REDUCTIONS = ("sum", "mean")


class GradES:
    """Track each matrix's L1 convergence signal and decide which to freeze and when to stop.

    Paper: Wen et al., *GradES*, arXiv:2509.01842 (see the module docstring for the rule).

    Deviations: ``patience`` (consecutive checks below τ) generalises the code's single check (``patience=1``);
    ``reduction="mean"`` divides the L1 norm by the matrix size so one τ fits matrices of any shape (the paper and
    code use the plain sum); the first weight-change check yields no signal (the code's 0.0 is a bug with α = 0).

    Args:
        names: the tracked matrices, in a fixed order (parameter names), non-empty and unique.
        tau: freezing threshold τ on the signal, > 0. Code default ``1e-4``; the README recommends 2.404 for full
            fine-tuning with the summed weight change. Scale it with the signal: with ``reduction="mean"`` it is a
            per-entry change (or gradient) magnitude.
        grace_fraction: α, the share of ``total_steps`` before any matrix may freeze, in [0, 1). Code default
            ``0.3``, README 0.55. Larger is safer and saves less.
        total_steps: T, the planned number of optimizer steps, ≥ 1.
        max_frozen_ratio: stop once this share of matrices is frozen, in (0, 1]. Default ``1.0`` (all frozen).
        signal: ``"weight_change"`` (code) or ``"grad"`` (paper abstract). Default ``"weight_change"``. With plain
            SGD they differ by the learning rate; with Adam-type optimizers the weight change is normalised per
            coordinate and includes decoupled weight decay.
        reduction: ``"sum"`` (paper/code) or ``"mean"`` over the matrix's entries. Default ``"sum"``.
        patience: consecutive checks below τ needed to freeze, ≥ 1. Default ``1`` (code).

    State: frozen names and the step each froze at, per-matrix streaks and last signals, cached reference weights
    (weight-change signal), check count, ``version``.

    Raises:
        ValueError: for an empty or duplicated ``names``, ``tau`` ≤ 0, ``grace_fraction`` outside [0, 1),
            ``total_steps`` < 1, ``max_frozen_ratio`` outside (0, 1], an unknown ``signal``/``reduction``, or
            ``patience`` < 1. TypeError: a non-number ``tau``/fraction or a non-int ``total_steps``/``patience``.

    Example::

        core = GradES(["l1.weight", "l2.weight"], tau=1e-3, grace_fraction=0.3, total_steps=1000)
        newly_frozen = core.update(step, [p.grad for p in matrices])
    """

    STATE_VERSION = 1

    def __init__(
        self,
        names: Sequence[str],
        tau: float,
        grace_fraction: float = 0.3,
        total_steps: int = 1,
        max_frozen_ratio: float = 1.0,
        signal: str = "weight_change",
        reduction: str = "sum",
        patience: int = 1,
    ) -> None:
        names = list(names)
        if not names or len(set(names)) != len(names):
            raise argument_error("GradES", "names", "a non-empty list of unique names", names)
        validate_grades_args("GradES", tau, grace_fraction, max_frozen_ratio, signal, reduction, patience)
        check_int_at_least("GradES", "total_steps", total_steps, 1)
        self.names = names
        self.tau = float(tau)
        self.grace_fraction = float(grace_fraction)
        self.total_steps = int(total_steps)
        self.max_frozen_ratio = float(max_frozen_ratio)
        self.signal = signal
        self.reduction = reduction
        self.patience = int(patience)
        self.frozen: dict[str, int] = {}  # name -> step it froze at
        self.streak: dict[str, int] = {n: 0 for n in names}
        self.last_signal: dict[str, float] = {}
        self.reference: dict[str, Tensor] = {}
        self.checks = 0

    # -- decisions --------------------------------------------------------------------------------------------
    @property
    def grace_steps(self) -> int:
        """``floor(α · T)``: no matrix freezes before this step."""
        return int(math.floor(self.grace_fraction * self.total_steps))

    @property
    def active(self) -> list[str]:
        """Names not yet frozen, in order."""
        return [n for n in self.names if n not in self.frozen]

    @property
    def frozen_fraction(self) -> float:
        return len(self.frozen) / len(self.names)

    @property
    def should_stop(self) -> bool:
        """True once the frozen share reaches ``max_frozen_ratio``."""
        return self.frozen_fraction >= self.max_frozen_ratio - 1e-12

    def measure(self, tensors: Sequence[Tensor]) -> Tensor | None:
        """The signal of each *active* matrix (``tensors`` aligned with :attr:`active`), or ``None`` on the first
        weight-change call, which only caches the weights.

        For ``signal="grad"`` pass the gradients, for ``"weight_change"`` the weights themselves.
        """
        active = self.active
        if len(tensors) != len(active):
            raise ValueError(f"GradES.measure: got {len(tensors)} tensors for {len(active)} active matrices.")
        if self.signal == "grad":
            norms = stats.per_tensor_norms(tensors, 1.0)
        else:
            if any(n not in self.reference for n in active):
                self.reference = {n: t.detach().clone() for n, t in zip(active, tensors)}
                return None
            deltas = [t.detach() - self.reference[n] for n, t in zip(active, tensors)]
            norms = stats.per_tensor_norms(deltas, 1.0)
            for n, t in zip(active, tensors):
                self.reference[n].copy_(t.detach())
        if self.reduction == "mean":
            sizes = torch.tensor([float(t.numel()) for t in tensors], device=norms.device)
            norms = norms / sizes
        return norms

    def decide(self, step: int, signals: Tensor | Sequence[float] | None) -> list[str]:
        """Fold one check's signals (aligned with :attr:`active`) in; return the names frozen now.

        Non-finite signals reset that matrix's streak and never freeze it. ``None`` (no signal yet) is a no-op.
        """
        if signals is None:
            return []
        values = signals.tolist() if isinstance(signals, Tensor) else [float(s) for s in signals]
        active = self.active
        if len(values) != len(active):
            raise ValueError(f"GradES.decide: got {len(values)} signals for {len(active)} active matrices.")
        self.checks += 1
        newly: list[str] = []
        for name, value in zip(active, values):
            self.last_signal[name] = value
            below = math.isfinite(value) and value < self.tau
            self.streak[name] = self.streak[name] + 1 if below else 0
            if step >= self.grace_steps and self.streak[name] >= self.patience:
                newly.append(name)
        for name in newly:
            self.frozen[name] = int(step)
            self.reference.pop(name, None)
        return newly

    def update(self, step: int, tensors: Sequence[Tensor]) -> list[str]:
        """:meth:`measure` then :meth:`decide` (single process; the adapter reduces signals across ranks between)."""
        return self.decide(step, self.measure(tensors))

    # -- state ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": self.STATE_VERSION,
            "names": list(self.names),
            "frozen": dict(self.frozen),
            "streak": dict(self.streak),
            "last_signal": dict(self.last_signal),
            "reference": {n: t.detach().cpu().clone() for n, t in self.reference.items()},
            "checks": self.checks,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_version(type(self).__name__, state, self.STATE_VERSION)
        unknown = [n for n in list(state["frozen"]) + list(state["streak"]) if n not in self.streak]
        if unknown:
            raise RuntimeError(f"GradES: checkpoint names matrices this model lacks: {sorted(set(unknown))}.")
        self.frozen = {str(k): int(v) for k, v in state["frozen"].items()}
        self.streak.update({str(k): int(v) for k, v in state["streak"].items()})
        self.last_signal = {str(k): float(v) for k, v in state["last_signal"].items()}
        self.reference = {str(k): v.clone() for k, v in state["reference"].items()}
        self.checks = int(state["checks"])


def validate_grades_args(
    owner: str, tau: float, grace_fraction: float, max_frozen_ratio: float, signal: str, reduction: str,
    patience: int,
) -> None:
    """Shared validation (core and callback), so both refuse the same nonsense with the owner's name."""
    check_number(owner, "tau", tau, 0, low_open=True)
    check_number(owner, "grace_fraction", grace_fraction, 0, 1, high_open=True)
    check_number(owner, "max_frozen_ratio", max_frozen_ratio, 0, 1, low_open=True)
    check_choice(owner, "signal", signal, SIGNALS)
    check_choice(owner, "reduction", reduction, REDUCTIONS)
    check_int_at_least(owner, "patience", patience, 1)
