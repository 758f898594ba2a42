"""Group id of every example of a dataset (the groups a budget is allocated across). Torch only."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

__all__ = ["resolve_groups"]

_GROUP_ATTRS = ("groups", "targets", "labels")


def resolve_groups(dataset: Dataset, group_fn: Callable[[Dataset, int], int] | None = None) -> Tensor:
    """Group id of every example: ``group_fn(dataset, i)`` if given, else the first of the dataset attributes
    ``groups``, ``targets``, ``labels``, else (``TensorDataset``) its last tensor when it is 1-D integer labels.

    Raises:
        TypeError: if none of these applies (pass ``group_fn``).
    """
    if group_fn is not None:
        return torch.tensor([int(group_fn(dataset, i)) for i in range(len(dataset))], dtype=torch.long)
    for attr in _GROUP_ATTRS:
        if hasattr(dataset, attr):
            return torch.as_tensor(getattr(dataset, attr)).long().flatten()
    if isinstance(dataset, TensorDataset):
        last = dataset.tensors[-1]
        if last.ndim == 1 and not last.is_floating_point():
            return last.long()
    raise TypeError(
        f"GradientVarianceSampling: cannot tell the groups of a {type(dataset).__name__}: pass `group_fn(dataset, "
        f"index) -> int`, or give the dataset a `groups`/`targets`/`labels` attribute."
    )
