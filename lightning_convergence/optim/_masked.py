"""Sync-free step masking shared by the optimizers that own their communication (imports torch only)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["where_ok"]


def where_ok(ok: Tensor, value: float, otherwise: float, like: Tensor) -> Tensor:
    """A 0-dim tensor in ``like``'s dtype and device: ``value`` if ``ok`` else ``otherwise``, read on device.

    Used as a multiplier so that a step dropped for non-finite gradients changes nothing, without a host sync.
    Both constants are built in ``like``'s dtype, so float64 runs are not rounded through float32.
    """
    a = torch.full((), value, dtype=like.dtype, device=like.device)
    return torch.where(ok, a, torch.full((), otherwise, dtype=like.dtype, device=like.device))
