"""Fit budget schedules returned by ``configure_optimizers`` to the trainer's step budget."""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from lightning_convergence.optim.schedules import resolve_total_steps

__all__ = ["BudgetScheduleSync", "sync_schedules"]


def sync_schedules(trainer: Trainer, warned: set[int] | None = None) -> None:
    """Apply :func:`~lightning_convergence.optim.schedules.resolve_total_steps` to every LR scheduler of
    ``trainer`` with its ``estimated_stepping_batches``."""
    configs = trainer.lr_scheduler_configs
    if not configs:
        return
    budget = float(trainer.estimated_stepping_batches)
    for config in configs:
        resolve_total_steps(config.scheduler, budget, warned)


class BudgetScheduleSync(Callback):
    """Give budget schedules (``LinearDecay``, ``WSDSchedule``, ...) the trainer's step budget.

    At fit start, every :class:`~lightning_convergence.optim.BudgetSchedule` among the trainer's LR schedulers with
    ``total_steps=None`` takes ``trainer.estimated_stepping_batches``, and one whose explicit ``total_steps``
    differs from it warns once (a schedule longer than the run never decays fully; a shorter one sits at the
    minimum rate for the rest). The schedules step once per optimizer step by themselves, whether
    ``configure_optimizers`` returns them bare or with ``"interval": "step"``; the ``lightning-convergence`` CLI does
    the same fitting without this callback.

    Paper: none (plumbing for the budget-aware schedules of :mod:`lightning_convergence.optim.schedules`).

    Args: none.

    State: none.

    Logs: none.

    Raises:
        ValueError: at fit start, when ``total_steps`` is None and the trainer has no finite budget
            (set ``max_steps`` or ``max_epochs``).

    Example::

        Trainer(max_steps=600, callbacks=[BudgetScheduleSync()])   # configure_optimizers: LinearDecay(opt)
    """

    def __init__(self) -> None:
        self._warned: set[int] = set()

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        sync_schedules(trainer, self._warned)
