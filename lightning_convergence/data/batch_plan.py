"""Batch planning for adaptive batch sizes: which ``(per_device, accumulation)`` realises a target global batch, and
how learning rates follow a batch change (torch only; no ``lightning`` import).

The global batch is ``per_device × world_size × accumulation``; only multiples of ``per_device × world_size`` are
achievable, so a target is rounded up (down where rounding up would pass ``max_batch_size``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from lightning_convergence._checks import argument_error, check_choice, check_int_at_least, check_number
from lightning_convergence.stats.batch_tests import BATCH_TESTS

__all__ = ["ESTIMATORS", "LR_SCALING", "check_adaptive_batch_args", "lr_scale_ratio", "plan_batch", "scale_lrs"]

LR_SCALING = ("none", "linear", "sqrt")
ESTIMATORS = ("auto", "microbatch", "per_sample")


def plan_batch(
    target: int, world_size: int, per_device: int, accumulation: int, max_per_device: int | None,
    max_batch_size: int | None, resize_device: bool, min_accumulation: int = 1,
) -> tuple[int, int]:
    """The ``(per_device, accumulation)`` whose global batch ``per_device × world_size × accumulation`` is the
    smallest achievable one ≥ ``target`` (or the largest ≤ ``max_batch_size`` when rounding up would pass it).

    With ``resize_device`` (at an epoch boundary) the per-device batch may change, up to ``max_per_device``, and
    accumulation is the smallest that fits, at least ``min_accumulation`` (2 keeps two micro-batch gradient samples
    per step on one device); otherwise only the accumulation changes (``accumulation`` is then not read).
    """
    if resize_device and max_per_device is not None:
        accumulation = max(math.ceil(target / (world_size * max_per_device)), min_accumulation, 1)
        per_device = max(min(math.ceil(target / (world_size * accumulation)), max_per_device), 1)
        if max_batch_size is not None and per_device * world_size * accumulation > max_batch_size:
            per_device = max(max_batch_size // (world_size * accumulation), 1)
        return per_device, accumulation
    k = max(math.ceil(target / (world_size * per_device)), 1)
    if max_batch_size is not None and k > 1 and per_device * world_size * k > max_batch_size:
        k -= 1
    return per_device, k


def lr_scale_ratio(old_batch: int, new_batch: int, rule: str) -> float:
    """The learning-rate factor for a batch change ``old → new``: ``new/old`` (``"linear"``, Goyal et al. 2017 for
    SGD), ``sqrt(new/old)`` (``"sqrt"``, Malladi et al. 2022 for Adam-type) or 1 (``"none"``, or no change).

    Raises:
        ValueError: for an unknown ``rule``.
    """
    check_choice("lr_scale_ratio", "rule", rule, LR_SCALING)
    if rule == "none" or old_batch <= 0 or new_batch == old_batch:
        return 1.0
    ratio = new_batch / old_batch
    return ratio if rule == "linear" else math.sqrt(ratio)


def scale_lrs(optimizers: Iterable[torch.optim.Optimizer], schedulers: Iterable[Any], ratio: float) -> None:
    """Multiply every param group's ``lr`` (and ``initial_lr``) and every scheduler's ``base_lrs`` by ``ratio``, so
    schedulers that recompute the rate from their base keep the scaling."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * ratio
            if "initial_lr" in group:
                group["initial_lr"] = group["initial_lr"] * ratio
    for scheduler in schedulers:
        base = getattr(scheduler, "base_lrs", None)
        if base is not None:
            scheduler.base_lrs = [lr * ratio for lr in base]


def check_adaptive_batch_args(
    name: str, *, test: str, lr_scaling: str, variance_estimator: str, eta: float, theta: float, nu: float,
    noise_scale_factor: float, check_every_n_steps: int, min_batch_size: int | None, max_batch_size: int | None,
    max_per_device_batch_size: int | None, per_sample_max_examples: int, log_every_n_steps: int | None,
    max_growth_factor: float | None, smoothing: float, noise_ema_beta: float, loss_fn: Any, batch_loss_fn: Any,
) -> None:
    """Refuse out-of-range adaptive-batch settings with ``{name}: `field` must be ..., got ...``.

    Raises:
        ValueError: an unknown choice or a value out of its range. TypeError: a loss function that is not callable.
    """
    for field, value, choices in (
        ("test", test, BATCH_TESTS), ("lr_scaling", lr_scaling, LR_SCALING),
        ("variance_estimator", variance_estimator, ESTIMATORS),
    ):
        check_choice(name, field, value, choices)
    for field, value in (("eta", eta), ("theta", theta), ("nu", nu), ("noise_scale_factor", noise_scale_factor)):
        check_number(name, field, value, 0, low_open=True)
    for field, value, low in (
        ("check_every_n_steps", check_every_n_steps, 1), ("min_batch_size", min_batch_size, 1),
        ("max_batch_size", max_batch_size, 1), ("max_per_device_batch_size", max_per_device_batch_size, 1),
        ("per_sample_max_examples", per_sample_max_examples, 2), ("log_every_n_steps", log_every_n_steps, 1),
    ):
        if value is not None:
            check_int_at_least(name, field, value, low)
    if min_batch_size is not None and max_batch_size is not None and max_batch_size < min_batch_size:
        raise argument_error(name, "max_batch_size", f">= `min_batch_size` ({min_batch_size})", max_batch_size)
    check_number(name, "max_growth_factor", max_growth_factor, 1, low_open=True, optional=True)
    for field, value in (("smoothing", smoothing), ("noise_ema_beta", noise_ema_beta)):
        check_number(name, field, value, 0, 1, high_open=True)
    for field, fn in (("loss_fn", loss_fn), ("batch_loss_fn", batch_loss_fn)):
        if fn is not None and not callable(fn):
            raise argument_error(name, field, "None or a callable", fn, TypeError)
