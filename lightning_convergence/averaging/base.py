"""Shared pieces of the local-SGD cores: the communicator, flat-buffer helpers and the outer-step interface.

A core never calls ``torch.distributed`` directly: it is handed a :class:`Communicator` (from the one communication
layer, :mod:`lightning_convergence.comm`, re-exported here), so tests can pass a fake (torchft's doubling all-reduce
trick) and the strategy passes :class:`TorchDistCommunicator`. Imports torch only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_convergence._checks import check_state_version
from lightning_convergence.comm import Communicator, PendingMean, TorchDistCommunicator
from lightning_convergence.stats import all_finite, sq_norm

__all__ = [
    "Communicator",
    "OuterStep",
    "PendingMean",
    "SyncStats",
    "TorchDistCommunicator",
    "flatten",
    "float_state_tensors",
    "unflatten_into",
]

STATE_VERSION = 1


def flatten(tensors: list[Tensor], dtype: torch.dtype | None = torch.float32) -> Tensor:
    """One contiguous 1-D copy of ``tensors`` (cast to ``dtype`` unless ``None``)."""
    if not tensors:
        return torch.zeros(0, dtype=dtype or torch.float32)
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    return flat if dtype is None else flat.to(dtype)


def unflatten_into(flat: Tensor, tensors: list[Tensor]) -> None:
    """Copy consecutive slices of ``flat`` into ``tensors`` (casting to each tensor's dtype), in place."""
    offset = 0
    with torch.no_grad():
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n


def float_state_tensors(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The optimizer's floating-point state tensors (Adam moments, momentum buffers; ``step`` counters excluded), in
    parameter order, then by state name."""
    out = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            out += [v for k, v in sorted(state.items()) if k != "step" and torch.is_tensor(v) and v.is_floating_point()]
    return out


@dataclass
class SyncStats:
    """What one synchronisation did.

    Attributes:
        bytes_sent: link bytes this rank sent for this round, as the communicator counted them
            (:attr:`Communicator.link_bytes_total` after minus before).
        pseudo_grad_sq: squared l2 norm of the pseudo-gradient this rank saw (global for all-reduce methods,
            this rank's for NoLoCo); the strategy averages it over ranks before logging its square root.
        divergence_sq: ``||θ_i − θ̄||²`` with ``θ̄`` the mean this round averaged over (before averaging).
        skipped: the round was dropped because the averaged update was not finite.
    """

    bytes_sent: int
    pseudo_grad_sq: Tensor
    divergence_sq: Tensor
    skipped: bool = False


class OuterStep:
    """Interface of an outer step: what happens to the replicas every time the schedule says "sync".

    ``init_state(params)`` is called once the replicas are identical (after the initial broadcast, and again when a
    warm-up DDP phase ends); ``sync(params, comm, step)`` runs the round in place on ``params``; ``finalize`` is
    called before the final merge (only overlapped methods have work in flight); :meth:`average_` averages any
    extra tensors (buffers, optimizer state) with the same communication pattern as the models.

    Attributes:
        leaves_replicas_identical: every rank holds the same parameters after :meth:`sync` (a global average or
            a global outer step); ``False`` for methods that mix partially or keep a round in flight.
    """

    name: str = "outer"
    leaves_replicas_identical: bool = False

    def init_state(self, params: list[Tensor]) -> None:
        raise NotImplementedError

    def sync(self, params: list[Tensor], comm: Communicator, step: int) -> SyncStats:
        raise NotImplementedError

    def finalize(self, params: list[Tensor], comm: Communicator) -> SyncStats | None:
        """Apply anything still in flight (default: nothing)."""
        return None

    def average_(self, tensors: list[Tensor], comm: Communicator, step: int) -> None:
        """Average ``tensors`` in place across the replicas this method mixes (default: all ranks, one flat
        all-reduce)."""
        comm.all_reduce_mean_flat_(tensors)

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    # helpers for subclasses
    def _check_version(self, state: dict[str, Any]) -> None:
        check_state_version(type(self).__name__, state, STATE_VERSION)

    def _require_state(self, tensor: Tensor | None) -> Tensor:
        if tensor is None:
            raise RuntimeError(f"{type(self).__name__}: call `init_state(params)` before `sync`.")
        return tensor


def finite(t: Tensor) -> bool:
    """True when every entry of ``t`` is finite (one host sync)."""
    return all_finite([t])


def sqn(t: Tensor) -> Tensor:
    """Squared l2 norm of one flat tensor (through the stats core)."""
    return sq_norm([t])
