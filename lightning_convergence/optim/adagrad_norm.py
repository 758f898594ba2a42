"""AdaGrad-Norm: AdaGrad with one scalar step size shared by all parameters."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from lightning_convergence import stats
from lightning_convergence._checks import check_number

__all__ = ["AdaGradNorm"]


class AdaGradNorm(Optimizer):
    """AdaGrad-Norm: ``b_{k+1}^2 = b_k^2 + ||g_k||^2``, ``x_{k+1} = x_k - lr * g_k / b_{k+1}``.

    Paper: Ward, Wu, Bottou. *AdaGrad stepsizes: Sharp convergence over nonconvex landscapes.* ICML 2019 / JMLR 2020,
    arXiv:1806.01811. Used as the base optimizer of Lau, Liu, Kolar, *AdAdaGrad: Adaptive Batch Size Schemes for
    Adaptive Gradient Methods*, arXiv:2402.11215.

    ``||g_k||`` is the l2 norm of the gradient over **all** parameter groups (one global scalar ``b``), computed with
    :func:`lightning_convergence.stats.sq_norm`. Each group may have its own ``lr`` (a per-group multiplier of the
    shared step ``1/b``) and ``weight_decay``.

    Deviations: the scalar is global, not per output channel (AdAdaGrad's repo has a per-row variant); coupled weight
    decay (``g += weight_decay * x``, before the norm) is an addition. Steps with a non-finite gradient are skipped
    (no update, ``b`` unchanged) and counted in ``param_groups[i]["nonfinite_skipped_total"]``.

    Args:
        params: parameters or parameter groups.
        lr: ``alpha``, the step-size numerator, > 0. Default 1.0 (the method adapts the scale; the theory allows any
            alpha, and 0.1-10 all converge on well-scaled problems: try 1, then x/÷ 3).
        initial_accumulator_value: ``b_0^2`` > 0. Default 1e-2 (AdAdaGrad's value). Too small gives a huge first
            step when the first gradient is tiny; too large makes the first steps very short (``b`` only grows).
        weight_decay: coupled L2 coefficient >= 0. Default 0.

    State: ``b_sq`` (``b_k^2``, a Python float) and ``nonfinite_skipped_total`` in every parameter group (all groups
    hold the same values), so the stock ``state_dict`` round-trips.

    Raises:
        ValueError: for ``lr`` <= 0, ``initial_accumulator_value`` <= 0 or ``weight_decay`` < 0.

    Example::

        opt = AdaGradNorm(model.parameters(), lr=1.0)
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]],
        lr: float = 1.0,
        initial_accumulator_value: float = 1e-2,
        weight_decay: float = 0.0,
    ) -> None:
        check_number("AdaGradNorm", "lr", lr, 0, low_open=True)
        check_number("AdaGradNorm", "initial_accumulator_value", initial_accumulator_value, 0, low_open=True)
        check_number("AdaGradNorm", "weight_decay", weight_decay, 0)
        defaults = {"lr": float(lr), "weight_decay": float(weight_decay)}
        super().__init__(params, defaults)
        for group in self.param_groups:
            group.setdefault("b_sq", float(initial_accumulator_value))
            group.setdefault("nonfinite_skipped_total", 0)

    @property
    def b(self) -> float:
        """The current shared scalar ``b_k``."""
        return float(self.param_groups[0]["b_sq"]) ** 0.5

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads: list[torch.Tensor] = []
        for group in self.param_groups:
            wd = group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grads.append(p.grad.add(p, alpha=wd) if wd else p.grad)
        if not grads:
            return loss
        if not stats.all_finite(grads):
            for group in self.param_groups:
                group["nonfinite_skipped_total"] += 1
            return loss
        b_sq = float(self.param_groups[0]["b_sq"]) + float(stats.sq_norm(grads))
        inv_b = b_sq ** -0.5
        i = 0
        for group in self.param_groups:
            group["b_sq"] = b_sq
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.add_(grads[i], alpha=-group["lr"] * inv_b)
                i += 1
        return loss
