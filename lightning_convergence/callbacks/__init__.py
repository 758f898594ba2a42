"""Lightning callbacks: thin adapters that wire the cores to Trainer hooks."""

from lightning_convergence.callbacks.grad_stats_monitor import GradientStatsMonitor

__all__ = ["GradientStatsMonitor"]
