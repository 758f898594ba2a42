"""Optimizers and budget-aware learning-rate schedules (cores: they import torch only, never lightning)."""

from lightning_convergence.optim.adagrad_norm import AdaGradNorm
from lightning_convergence.optim.demo import DeMo
from lightning_convergence.optim.onebit_adam import OnebitAdam
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
    "AdamWScheduleFree",
    "SGDScheduleFree",
    "BudgetSchedule",
    "CosineDecay",
    "DeMo",
    "LinearDecay",
    "OnebitAdam",
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

_SCHEDULE_FREE = ("AdamWScheduleFree", "SGDScheduleFree", "RAdamScheduleFree")


def __getattr__(name: str):
    """Lazy re-exports of the ``schedulefree`` package's optimizers (the optional ``optim`` extra).

    ``lightning_convergence.optim.AdamWScheduleFree`` works as a YAML ``class_path`` and raises an ImportError naming
    the extra when ``schedulefree`` is not installed; importing this package never needs it.
    """
    if name in _SCHEDULE_FREE:
        try:
            import schedulefree
        except ImportError as err:
            raise ImportError(
                f"lightning_convergence.optim.{name} needs the `schedulefree` package: "
                "pip install 'lightning-convergence[optim]' (or pip install schedulefree)."
            ) from err
        return getattr(schedulefree, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
