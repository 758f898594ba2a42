"""Record the LR sequence a scheduler produces (shared by the schedule and refinement tests)."""

from __future__ import annotations

import torch


def lr_sequence(sched: torch.optim.lr_scheduler.LRScheduler, opt: torch.optim.Optimizer, steps: int) -> list[float]:
    """The first param group's LR at each of ``steps`` optimizer steps, stepping optimizer then scheduler."""
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out
