"""Budget-aware learning-rate schedules: linear decay, cosine, REX, UBA(phi) and warmup-stable-decay (WSD).

Every schedule here knows the total number of optimizer steps (the budget ``T``) up front and is a closed form of
the step count, so a resumed run continues the identical sequence: the only state is ``last_epoch`` (the step
count), which :class:`torch.optim.lr_scheduler.LRScheduler` already saves in its ``state_dict``.

Common shape (all classes)::

    warm-up   (s < W):  lr(s) = peak * (s + 1) / (W + 1)                      # W = warmup_steps
    decay     (s >= W): lr(s) = peak * (r + (1 - r) * shape(z)),  z = min((s - W) / (T - W), 1)

with ``peak`` the optimizer's initial ``lr`` (per parameter group), ``r = min_lr_ratio`` (``eta_min / eta_max``) and
``shape(0) = 1``, ``shape(1) = 0``. The warm-up ramp reaches the peak exactly at the first decay step; the last
step ``s = T - 1`` still gets a small positive rate (``z = (T-W-1)/(T-W)``), as in ``1 - t/T``.

These are *step* schedules, and they advance once per optimizer step however they are returned: each registers a
step post-hook on its optimizer, so ``return [opt], [LinearDecay(opt, ...)]`` (which Lightning steps once per
*epoch*) and ``{"scheduler": sched, "interval": "step"}`` give the same sequence, as does a plain PyTorch loop that
calls ``opt.step(); sched.step()``. ``sched.step()`` after an optimizer step only re-applies the current rate; called
without an optimizer step in between (a simulation on a stand-in optimizer) it advances, as any torch scheduler.
Each class still carries ``interval = "step"`` for code that reads it.

``total_steps=None`` leaves the budget to be filled in from the trainer
(``trainer.estimated_stepping_batches``) by :func:`resolve_total_steps`, which the
``lightning-convergence`` CLI and the ``BudgetScheduleSync`` callback call at fit start; they also warn once when
an explicit ``total_steps`` differs from the trainer's budget.

Pure functions (``*_shape``) are exported for use in any training loop and in tests. This module imports only torch.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from lightning_convergence._checks import argument_error, check_choice, check_int, check_number, check_state_version

__all__ = [
    "BudgetSchedule",
    "CosineDecay",
    "LinearDecay",
    "REXDecay",
    "UBADecay",
    "WSDSchedule",
    "budget_factor",
    "resolve_total_steps",
    "cosine_shape",
    "linear_shape",
    "rex_shape",
    "uba_shape",
    "wsd_shape",
    "WSD_DECAY_SHAPES",
]


# -- pure shapes on z in [0, 1] ---------------------------------------------------------------------------------
def linear_shape(z: float) -> float:
    """Linear decay ``1 - z`` (Defazio et al. 2023: worst-case optimal for the last iterate)."""
    return 1.0 - z


def cosine_shape(z: float) -> float:
    """Cosine annealing ``(1 + cos(pi z)) / 2`` (Loshchilov & Hutter, SGDR, arXiv:1608.03983)."""
    return 0.5 * (1.0 + math.cos(math.pi * z))


def rex_shape(z: float) -> float:
    """REX ``(1 - z) / (1 - z/2)`` (Chen, Wolfe, Kyrillidis, arXiv:2107.04197)."""
    return (1.0 - z) / (1.0 - 0.5 * z)


def uba_shape(z: float, phi: float) -> float:
    """UBA ``2(1 + cos(pi z)) / (2 phi + (2 - phi)(1 + cos(pi z)))`` (Tang et al., arXiv:2505.24452).

    ``phi = 2`` is cosine annealing exactly; ``phi < 2`` holds the rate high for longer, ``phi > 2`` decays sooner.
    """
    c = 1.0 + math.cos(math.pi * z)
    return 2.0 * c / (2.0 * phi + (2.0 - phi) * c)


def _sqrt_shape(u: float) -> float:
    return 1.0 - math.sqrt(u)


WSD_DECAY_SHAPES: dict[str, Callable[[float], float]] = {
    "linear": linear_shape,
    "cosine": cosine_shape,
    "1-sqrt": _sqrt_shape,
}


def wsd_shape(z: float, decay_fraction: float, decay_shape: str = "linear") -> float:
    """Warmup-stable-decay after warm-up: 1 for ``z < 1 - decay_fraction``, then ``decay_shape`` over the rest.

    With ``u = (z - (1 - f)) / f`` the position inside the decay phase (``f = decay_fraction``): ``linear`` is
    ``1 - u``, ``cosine`` is ``(1 + cos(pi u))/2`` and ``1-sqrt`` is ``1 - sqrt(u)`` (Hägele et al., arXiv:2405.18392).
    """
    start = 1.0 - decay_fraction
    if z < start:
        return 1.0
    u = (z - start) / decay_fraction if decay_fraction > 0 else 1.0
    return WSD_DECAY_SHAPES[decay_shape](min(u, 1.0))


def budget_factor(
    step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float, shape: Callable[[float], float]
) -> float:
    """The multiplier of the peak LR at optimizer step ``step`` (0-based); see the module docstring."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    z = min((step - warmup_steps) / (total_steps - warmup_steps), 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape(z)


# -- LRScheduler classes ----------------------------------------------------------------------------------------
class BudgetSchedule(LRScheduler):
    """Base class: a closed-form schedule over a known budget of ``total_steps`` optimizer steps, with warm-up.

    Subclasses implement :meth:`shape` (``[0, 1] -> [0, 1]``, ``shape(0) = 1``). The learning rate of each parameter
    group is ``initial_lr * budget_factor(step, ...)``; it never depends on the previous value, so loading a
    ``state_dict`` (which holds ``last_epoch``, the step count) continues the identical sequence.

    Args:
        optimizer: the wrapped optimizer; each group's ``lr`` at construction is its peak (``eta_max``).
        total_steps: the budget ``T`` in optimizer steps (``trainer.max_steps``, or
            ``trainer.estimated_stepping_batches``), > ``warmup_steps``. Past ``T`` the rate stays at the minimum.
            ``None``: filled in from the trainer at fit start (see the module docstring); stepping past warm-up
            before that raises.
        warmup_steps: linear warm-up steps ``W`` in ``[0, T)``. Default 0. Typical: 1-5% of ``T`` for Adam-type
            optimizers on transformers, 0 for SGD on small models.
        min_lr_ratio: ``eta_min / eta_max`` in ``[0, 1]``. Default 0 (decay to zero, as the budget-aware papers
            recommend; raise to 0.01-0.1 only if you continue training after ``T``).
        last_epoch: index of the last step taken (PyTorch convention); leave at -1.

    Raises:
        ValueError: if ``total_steps`` < 1, ``warmup_steps`` is outside ``[0, total_steps)``, or ``min_lr_ratio``
            is outside ``[0, 1]``.
        RuntimeError: on an optimizer step past warm-up while ``total_steps`` is still ``None``.
    """

    interval = "step"
    STATE_VERSION = 1

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int | None = None,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        name = type(self).__name__
        self.warmup_steps = check_int(name, "warmup_steps", warmup_steps, 0)
        self.min_lr_ratio = check_number(name, "min_lr_ratio", min_lr_ratio, 0, 1)
        self.total_steps: int | None = None
        if total_steps is not None:
            self.set_total_steps(total_steps)
        self.version = self.STATE_VERSION
        self._advanced_by_optimizer = False
        super().__init__(optimizer, last_epoch)
        ref = weakref.ref(self)

        def advance(opt: Optimizer, args: Any, kwargs: Any) -> None:
            sched = ref()
            if sched is not None:
                sched._on_optimizer_step()

        optimizer.register_step_post_hook(advance)

    def set_total_steps(self, total_steps: int) -> None:
        """Set the budget ``T`` (checked as in the constructor)."""
        name = type(self).__name__
        check_int(name, "total_steps", total_steps, 1)
        if not self.warmup_steps < total_steps:
            raise argument_error(name, "warmup_steps", f"an int in [0, total_steps={total_steps})", self.warmup_steps)
        self.total_steps = total_steps

    def _on_optimizer_step(self) -> None:
        """The optimizer's step post-hook: advance one step and apply the new rate."""
        self.last_epoch += 1
        self._apply()
        self._advanced_by_optimizer = True

    def _apply(self) -> None:
        lrs = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self._last_lr = list(lrs)

    def step(self, epoch: int | None = None) -> None:  # type: ignore[override]
        """Re-apply the current rate after an optimizer step already advanced the schedule; otherwise advance."""
        if self._advanced_by_optimizer and epoch is None:
            self._advanced_by_optimizer = False
            self._apply()
            return
        super().step(epoch)

    def shape(self, z: float) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def factor(self, step: int) -> float:
        """Multiplier of the peak LR at 0-based optimizer step ``step``."""
        if self.total_steps is None:
            if step <= self.warmup_steps:  # warm-up and the peak do not depend on the budget
                return budget_factor(step, step + 1, self.warmup_steps, self.min_lr_ratio, self.shape)
            raise RuntimeError(
                f"{type(self).__name__}: `total_steps` is None at optimizer step {step} and nothing filled it in: "
                "pass `total_steps` (e.g. `self.trainer.estimated_stepping_batches` in configure_optimizers), add "
                "`lightning_convergence.callbacks.BudgetScheduleSync()` to the Trainer's callbacks, or train "
                "through the lightning-convergence CLI."
            )
        return budget_factor(step, self.total_steps, self.warmup_steps, self.min_lr_ratio, self.shape)

    def get_lr(self) -> list[float]:  # type: ignore[override]
        f = self.factor(max(self.last_epoch, 0))
        return [base * f for base in self.base_lrs]

    def _get_closed_form_lr(self) -> list[float]:
        return self.get_lr()

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the step count (and the saved hyperparameters, as every torch scheduler does)."""
        if "version" in state_dict:  # torch's own scheduler state (no version) loads as version 1
            check_state_version(type(self).__name__, state_dict, self.STATE_VERSION)
        super().load_state_dict(state_dict)


class LinearDecay(BudgetSchedule):
    """Linear decay to ``min_lr_ratio`` over the budget, after optional warm-up: ``shape(z) = 1 - z``.

    Paper: Defazio, Cutkosky, Mehta, Mishchenko. *When, Why and How Much? Adaptive Learning Rate Scheduling by
    Refinement.* arXiv:2310.07831, 2023: linear decay is worst-case optimal for the last iterate and "matches or
    outperforms" cosine in their large study.

    Args: see :class:`BudgetSchedule`.

    Example::

        sched = LinearDecay(opt, total_steps=1000, warmup_steps=50)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
    """

    def shape(self, z: float) -> float:
        return linear_shape(z)


class CosineDecay(BudgetSchedule):
    """Cosine annealing over the budget, after optional warm-up: ``shape(z) = (1 + cos(pi z)) / 2``.

    Paper: Loshchilov & Hutter. *SGDR: Stochastic Gradient Descent with Warm Restarts.* ICLR 2017, arXiv:1608.03983
    (one cycle, no restarts). Without warm-up it equals ``torch.optim.lr_scheduler.CosineAnnealingLR(T_max=T,
    eta_min=r*peak)`` in closed form. The baseline of ``benchmarks/schedules.py``.

    Args: see :class:`BudgetSchedule`.
    """

    def shape(self, z: float) -> float:
        return cosine_shape(z)


class REXDecay(BudgetSchedule):
    """REX: ``shape(z) = (1 - z) / (1 - z/2)``: stays above linear, then drops to zero at the end.

    Paper: Chen, Wolfe, Kyrillidis. *REX: Revisiting Budgeted Training with an Improved Schedule.* MLSys 2022,
    arXiv:2107.04197.

    Args: see :class:`BudgetSchedule`.
    """

    def shape(self, z: float) -> float:
        return rex_shape(z)


class UBADecay(BudgetSchedule):
    """UBA (unified budget-aware) schedule with shape parameter ``phi``.

    ``shape(z) = 2(1 + cos(pi z)) / (2 phi + (2 - phi)(1 + cos(pi z)))``; ``phi = 2`` is cosine annealing exactly.

    Paper: Tang, Dong, Zeng, Zhou, Lin. *Stepsize anything: A unified learning rate schedule for budgeted-iteration
    training.* NeurIPS 2025, arXiv:2505.24452.

    Deviations: the formula is taken from a third-party implementation consistent with the paper (no official
    code; ``shared/papers/ALGORITHMS.md`` section 3); the paper's multi-phase form is not implemented (one phase).

    Args:
        optimizer, total_steps, warmup_steps, min_lr_ratio, last_epoch: see :class:`BudgetSchedule`.
        phi: shape parameter ``phi`` > 0. Default 2 (cosine). ``phi < 2`` (e.g. 0.5-1) keeps the rate high
            longer and drops late (like REX/WSD); ``phi > 2`` (e.g. 4) decays early. The paper ties ``phi`` to the
            condition number; tune it on a short run from {0.5, 1, 2, 4}.

    Raises:
        ValueError: as :class:`BudgetSchedule`, and if ``phi`` <= 0.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int | None = None,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        phi: float = 2.0,
        last_epoch: int = -1,
    ) -> None:
        self.phi = check_number("UBADecay", "phi", phi, 0, low_open=True)
        super().__init__(optimizer, total_steps, warmup_steps, min_lr_ratio, last_epoch)

    def shape(self, z: float) -> float:
        return uba_shape(z, self.phi)


class WSDSchedule(BudgetSchedule):
    """Warmup-stable-decay: warm up, hold the peak, then decay over the last ``decay_fraction`` of the budget.

    Papers: Hu et al. *MiniCPM* (arXiv:2404.06395) introduced WSD; Hägele et al. *Scaling Laws and Compute-Optimal
    Training Beyond Fixed Training Durations* (NeurIPS 2024, arXiv:2405.18392) compare decay shapes and find
    ``1-sqrt`` best, with a 10-20% cool-down matching cosine.

    Deviations: ``decay_fraction`` is a fraction of the post-warm-up steps ``T - W`` (not of ``T``).

    Args:
        optimizer, total_steps, warmup_steps, min_lr_ratio, last_epoch: see :class:`BudgetSchedule`.
        decay_fraction: fraction of the post-warm-up steps spent decaying, in ``(0, 1]``. Default 0.2. 1.0 with
            ``decay_shape="linear"`` is plain linear decay.
        decay_shape: ``"linear"``, ``"cosine"`` or ``"1-sqrt"``. Default ``"1-sqrt"`` (Hägele et al.'s best).

    Raises:
        ValueError: as :class:`BudgetSchedule`, for ``decay_fraction`` outside ``(0, 1]`` or an unknown shape.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int | None = None,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        decay_fraction: float = 0.2,
        decay_shape: str = "1-sqrt",
        last_epoch: int = -1,
    ) -> None:
        self.decay_fraction = check_number("WSDSchedule", "decay_fraction", decay_fraction, 0, 1, low_open=True)
        self.decay_shape = check_choice("WSDSchedule", "decay_shape", decay_shape, sorted(WSD_DECAY_SHAPES))
        super().__init__(optimizer, total_steps, warmup_steps, min_lr_ratio, last_epoch)

    def shape(self, z: float) -> float:
        return wsd_shape(z, self.decay_fraction, self.decay_shape)


def resolve_total_steps(scheduler: Any, budget: float, warned: set[int] | None = None) -> None:
    """Fit a :class:`BudgetSchedule` to the trainer's budget of ``budget`` optimizer steps.

    ``total_steps=None`` becomes ``budget``; an explicit ``total_steps`` that differs from a finite ``budget`` warns
    (once per scheduler when ``warned`` is passed and kept). Anything that is not a :class:`BudgetSchedule` is left
    alone.

    Raises:
        ValueError: if ``total_steps`` is None and ``budget`` is not a finite number >= 1 (set ``max_steps``).
    """
    if not isinstance(scheduler, BudgetSchedule):
        return
    name = type(scheduler).__name__
    finite = isinstance(budget, (int, float)) and math.isfinite(budget) and budget >= 1
    if scheduler.total_steps is None:
        if not finite:
            raise ValueError(
                f"{name}: `total_steps` is None but the trainer's budget is unknown ({budget}); pass `total_steps` "
                "or set the Trainer's `max_steps` or `max_epochs`."
            )
        scheduler.set_total_steps(int(budget))
        return
    if finite and scheduler.total_steps != int(budget) and (warned is None or id(scheduler) not in warned):
        if warned is not None:
            warned.add(id(scheduler))
        share = min(int(budget) / scheduler.total_steps, 1.0)
        warnings.warn(
            f"{name}: `total_steps`={scheduler.total_steps} but the trainer will take {int(budget)} optimizer steps "
            f"(`trainer.estimated_stepping_batches`): training covers {share:.0%} of the schedule"
            + (" and then stays at the minimum rate" if int(budget) > scheduler.total_steps else "")
            + ". Pass `total_steps=None` to follow the trainer.",
            stacklevel=2,
        )
