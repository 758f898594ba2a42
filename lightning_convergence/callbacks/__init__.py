"""Lightning callbacks: thin adapters that wire the cores to Trainer hooks."""

from lightning_convergence.callbacks.adaptive_batch import AdaptiveBatchSize
from lightning_convergence.callbacks.convergence_stop import ConvergenceEarlyStopping, ConvergenceStopReason
from lightning_convergence.callbacks.grad_stats_monitor import GradientStatsMonitor
from lightning_convergence.callbacks.gradient_early_stopping import GradientEarlyStopping
from lightning_convergence.callbacks.schedule_free import ScheduleFreeModeSwitch
from lightning_convergence.callbacks.schedule_refinement import ScheduleRefinement
from lightning_convergence.callbacks.schedule_sync import BudgetScheduleSync
from lightning_convergence.callbacks.variance_sampling import GradientVarianceSampling

__all__ = [
    "AdaptiveBatchSize",
    "BudgetScheduleSync",
    "ConvergenceEarlyStopping",
    "ConvergenceStopReason",
    "GradientEarlyStopping",
    "GradientStatsMonitor",
    "GradientVarianceSampling",
    "ScheduleFreeModeSwitch",
    "ScheduleRefinement",
]
