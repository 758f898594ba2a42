"""Small Trainer facts the callbacks share (private)."""

from __future__ import annotations

from typing import Any

__all__ = ["grad_scale", "hook_loss_factor"]


def grad_scale(trainer: Any) -> float:
    """The AMP loss scale in force for this step's backward passes (1 without an enabled GradScaler)."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return 1.0
    return float(scaler.get_scale())


def hook_loss_factor(trainer: Any) -> float:
    """What a tensor hook's micro-batch gradient must be multiplied by to be that micro-batch's mean gradient:
    Lightning divides each micro-batch loss by the accumulation factor, and AMP multiplies it by the loss scale."""
    return float(trainer.accumulate_grad_batches) / grad_scale(trainer)
