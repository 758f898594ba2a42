"""Optimizers and budget-aware learning-rate schedules (cores: they import torch only, never lightning)."""

from lightning_convergence.optim.adagrad_norm import AdaGradNorm
from lightning_convergence.optim.refinement import (
    RefinedSchedule,
    load_norms,
    median_smooth,
    online_profile,
    refine_schedule,
    save_norms,
)
from lightning_convergence.optim.schedules import (
    BudgetSchedule,
    CosineDecay,
    LinearDecay,
    REXDecay,
    UBADecay,
    WSDSchedule,
)

__all__ = [
    "AdaGradNorm",
    "BudgetSchedule",
    "CosineDecay",
    "LinearDecay",
    "REXDecay",
    "RefinedSchedule",
    "UBADecay",
    "WSDSchedule",
    "load_norms",
    "median_smooth",
    "online_profile",
    "refine_schedule",
    "save_norms",
]
