"""Forecast the learning rate of the coming optimizer steps by stepping a copy of an LR scheduler (torch only; no
``lightning`` import). The real optimizer, its state and the real scheduler are never touched."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch

__all__ = ["forecast_lrs"]


class _ShadowOptimizer:
    """A parameter-free stand-in for an optimizer: LR schedulers only read and write ``param_groups``."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.param_groups = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} | {"params": []}
                             for g in optimizer.param_groups]
        self.defaults = dict(optimizer.defaults)

    def step(self) -> None:  # pragma: no cover - never called; present for schedulers that inspect it
        pass


def forecast_lrs(
    scheduler: Any, optimizer: torch.optim.Optimizer, step: int, remaining: int, interval: str = "step",
    frequency: int = 1, steps_per_epoch: int = 1,
) -> list[float] | None:
    """The first param group's LR for each of the next ``remaining`` optimizer steps after ``step``, by stepping a
    copy of ``scheduler`` bound to a parameter-free stand-in of ``optimizer``.

    ``interval``/``frequency`` say when the scheduler steps (every ``frequency`` optimizer steps, or every
    ``frequency`` epochs of ``steps_per_epoch`` optimizer steps). Returns ``None`` when the scheduler cannot be
    copied (the caller falls back to a constant rate).
    """
    shadow = _ShadowOptimizer(optimizer)
    try:
        twin = copy.deepcopy(scheduler, memo={id(optimizer): shadow})
    except Exception:
        return None
    if hasattr(twin, "_advanced_by_optimizer"):
        # A budget schedule advanced itself on the optimizer step just taken; the shadow holds that step's
        # successor rate already, so every twin.step() below must advance (not re-apply, as after a real step).
        twin._advanced_by_optimizer = False
    freq, per_epoch = max(int(frequency), 1), max(int(steps_per_epoch), 1)
    out: list[float] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k in range(remaining):
            out.append(float(shadow.param_groups[0]["lr"]))
            done = step + k + 1  # optimizer steps completed after this one
            if interval == "step":
                if done % freq == 0:
                    twin.step()
            elif done % per_epoch == 0 and (done // per_epoch) % freq == 0:
                twin.step()
    return out
