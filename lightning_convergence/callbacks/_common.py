"""Small Trainer facts the callbacks share (private)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_convergence._metrics import metric_key
from lightning_convergence._nonfinite import act_on_nonfinite
from lightning_convergence.comm import TorchDistCommunicator
from lightning_convergence.stats.module_grads import BatchLossFn, batch_length

__all__ = ["finite_metrics", "grad_scale", "handle_nonfinite", "hook_loss_factor", "probe_loss", "sum_all_reduce"]


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


def finite_metrics(trainer: Any, part: str, metrics: Mapping[str, float | Tensor]) -> dict[str, float | Tensor]:
    """``metrics`` without its NaN/inf entries, which are also removed from ``trainer.callback_metrics`` so no stale
    value of an earlier step stays there (no part logs a non-finite value; a missing key means "no estimate")."""
    out: dict[str, float | Tensor] = {}
    for name, value in metrics.items():
        v = float(value.detach()) if isinstance(value, Tensor) else float(value)
        if math.isfinite(v):
            out[name] = value
        else:
            trainer.callback_metrics.pop(metric_key(part, name), None)
    return out


def probe_loss(
    owner: str, batch_loss_fn: BatchLossFn | None, output_loss_fn: Callable[[Tensor, Tensor], Tensor] | None,
    batch_to_inputs: Callable[[Any], tuple[Tensor, Tensor]] | None = None,
) -> BatchLossFn | None:
    """The ``(module, batch) -> loss`` a gradient probe uses: ``batch_loss_fn`` if given; else ``output_loss_fn(
    module(inputs), targets)`` on ``(inputs, targets)`` (from ``batch_to_inputs``, default ``batch[0], batch[1]``)
    if an output loss is given; else ``None`` (the module's own ``training_step``)."""
    if batch_loss_fn is not None:
        return batch_loss_fn
    if output_loss_fn is None and batch_to_inputs is None:
        return None
    loss = output_loss_fn if output_loss_fn is not None else torch.nn.functional.cross_entropy

    def from_outputs(module: torch.nn.Module, batch: Any) -> Tensor:
        if batch_to_inputs is not None:
            x, y = batch_to_inputs(batch)
        elif isinstance(batch, (list, tuple)) and len(batch) >= 2:
            x, y = batch[0], batch[1]
        else:
            raise TypeError(
                f"{owner}: `loss_fn(output, target)` needs (inputs, targets, ...) batches, got a "
                f"{type(batch).__name__} of {batch_length(batch)} examples; pass `batch_to_inputs` or "
                "`batch_loss_fn(module, batch)`, or leave both unset to use the module's training_step."
            )
        return loss(module(x), y)

    return from_outputs


def handle_nonfinite(trainer: Any, pl_module: Any, owner: str, policy: str, found: bool, warned: bool,
                     what: str = "gradients") -> tuple[bool, bool]:
    """The shared non-finite step (``lightning_convergence._nonfinite``) for a callback that found ``found``.

    The finding is made global (``reduce_boolean_decision``, one small collective at the caller's measuring steps, so
    every rank takes the same branch). On a non-finite step the gradients are dropped (``.grad = None``: the
    optimizer skips the step for every parameter) and the policy applies (``"stop"`` sets ``should_stop`` and
    reports; ``"skip"`` warns once). Returns ``(global finding, warned)``.
    """
    if trainer.world_size > 1:
        found = bool(trainer.strategy.reduce_boolean_decision(found, all=False))
    if not found:
        return False, warned
    for p in pl_module.parameters():
        p.grad = None
    return True, act_on_nonfinite(trainer, owner, policy, what, warned=warned)


def sum_all_reduce(trainer: Any) -> Callable[[Tensor], Tensor] | None:
    """The in-place SUM all-reduce the statistics cores take, through :mod:`lightning_convergence.comm` (a
    :class:`~lightning_convergence.comm.TorchDistCommunicator` on the default group), or ``None`` on one process."""
    if trainer.world_size <= 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return None
    return TorchDistCommunicator().all_reduce_sum
