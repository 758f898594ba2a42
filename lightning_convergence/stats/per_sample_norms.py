"""Per-example squared gradient norms from per-example gradients (rows of ``[n, *param_shape]`` tensors).

Added for variance sampling (GVM's ``G_i`` is a mean of per-example gradient norms); kept here so that no other module
computes a norm itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["per_sample_sq_norms"]


def per_sample_sq_norms(samples: Sequence[Tensor]) -> Tensor:
    """``[n]`` float64 tensor: row ``i``'s squared l2 norm over all parameters (``Σ_p ‖samples[p][i]‖²``).

    Args:
        samples: one ``[n, *param_shape]`` tensor per parameter (e.g. from ``per_sample_grads``).

    Raises:
        ValueError: if ``samples`` is empty or the tensors disagree on ``n``.
    """
    if not samples:
        raise ValueError("per_sample_sq_norms: `samples` is empty.")
    n = samples[0].shape[0]
    if any(s.shape[0] != n for s in samples):
        raise ValueError("per_sample_sq_norms: every tensor in `samples` must have the same leading dimension.")
    out = torch.zeros(n, dtype=torch.float64, device=samples[0].device)
    for s in samples:
        out += s.reshape(n, -1).double().pow(2).sum(dim=1)
    return out
