"""The one helper that names, filters and writes ``convergence/<part>/<metric>`` metrics.

Every callback and strategy logs through :func:`log_metrics`, so keys follow one pattern, logging happens at the
trainer's ``log_every_n_steps`` cadence, and only global rank 0 writes. Values must already be global (reduced
across ranks by the caller) unless the metric name ends in ``/rank<k>``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from lightning_convergence._checks import argument_error, check_choice

if TYPE_CHECKING:  # lightning is imported lazily: cores never pull it in through this module.
    from lightning.pytorch import Trainer

__all__ = ["PARTS", "KEY_PATTERN", "metric_key", "log_metrics", "should_log"]

PARTS: tuple[str, ...] = ("grad_stats", "schedule", "batch", "sampling", "stop", "compress", "local_sgd", "fl")
KEY_PATTERN = re.compile(r"^convergence/(" + "|".join(PARTS) + r")/[a-z0-9_]+(/[A-Za-z0-9_.\-]+)*$")


def metric_key(part: str, name: str) -> str:
    """``convergence/<part>/<name>``, validated against :data:`KEY_PATTERN`.

    Raises:
        ValueError: if ``part`` is not one of :data:`PARTS` or ``name`` is not snake_case.
    """
    check_choice("metric_key", "part", part, PARTS)
    key = f"convergence/{part}/{name}"
    if not KEY_PATTERN.match(key):
        raise argument_error("metric_key", "name", "snake_case (optionally /item)", name)
    return key


def should_log(trainer: Trainer, log_every_n_steps: int | None = None) -> bool:
    """True on optimizer steps where metrics are due (``global_step % log_every_n_steps == 0``).

    ``log_every_n_steps=None`` follows the trainer's ``log_every_n_steps``.
    """
    n = log_every_n_steps or max(int(getattr(trainer, "log_every_n_steps", 50) or 1), 1)
    return trainer.global_step % n == 0


def log_metrics(
    trainer: Trainer,
    part: str,
    metrics: Mapping[str, float | torch.Tensor],
    step: int | None = None,
) -> dict[str, float]:
    """Write ``metrics`` as ``convergence/<part>/<name>`` to every logger of ``trainer``, from global rank 0.

    Also exposes them in ``trainer.callback_metrics`` (so Lightning's ``EarlyStopping`` or ``ModelCheckpoint``
    can monitor them). Returns the dict that was written (on every rank, for tests).
    """
    out: dict[str, float] = {}
    for name, value in metrics.items():
        v = float(value.detach().item()) if isinstance(value, torch.Tensor) else float(value)
        out[metric_key(part, name)] = v
    step = trainer.global_step if step is None else step
    cb = trainer.callback_metrics
    for k, v in out.items():
        cb[k] = torch.tensor(v)
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics(out, step=step)
    return out
