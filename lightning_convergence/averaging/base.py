"""Shared pieces of the local-SGD cores: the communicator, flat-buffer helpers and the outer-step interface.

A core never calls ``torch.distributed`` directly: it is handed a :class:`Communicator`, so tests can pass a fake
(torchft's doubling all-reduce trick) and the strategy passes :class:`TorchDistCommunicator`. Imports torch only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from lightning_convergence.stats import all_finite, sq_norm

__all__ = [
    "Communicator",
    "OuterStep",
    "PendingMean",
    "SyncStats",
    "TorchDistCommunicator",
    "allreduce_bytes",
    "flatten",
    "unflatten_into",
]

STATE_VERSION = 1


class PendingMean(Protocol):
    """A mean in flight (an ``async_op`` all-reduce): :meth:`wait` returns the averaged tensor."""

    def wait(self) -> Tensor: ...


class Communicator:
    """What a local-SGD core may ask of the network. Subclass it for fakes in tests.

    Attributes:
        rank: this process's rank in the averaging group.
        world_size: processes in the averaging group.
    """

    rank: int = 0
    world_size: int = 1

    def all_reduce_mean_(self, tensor: Tensor) -> None:
        """Replace ``tensor`` by its mean over all ranks, in place."""
        raise NotImplementedError

    def all_reduce_mean_async(self, tensor: Tensor) -> PendingMean:
        """Start averaging ``tensor`` (owned by the callee until :meth:`PendingMean.wait`) without blocking."""
        raise NotImplementedError

    def exchange(self, tensor: Tensor, peer: int) -> Tensor:
        """Send ``tensor`` to ``peer`` and return the tensor ``peer`` sent back (point-to-point, no collective)."""
        raise NotImplementedError

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """The sum of ``tensor`` over all ranks (in place; returned). Default: the mean times ``world_size``."""
        self.all_reduce_mean_(tensor)
        return tensor.mul_(self.world_size)

    def all_gather(self, tensor: Tensor) -> list[Tensor]:
        """Every rank's ``tensor`` (same shape everywhere), ordered by rank (compressed payloads that cannot be
        summed)."""
        raise NotImplementedError


class _DistPending:
    def __init__(self, work: Any, tensor: Tensor, world_size: int) -> None:
        self._work, self._tensor, self._world_size = work, tensor, world_size

    def wait(self) -> Tensor:
        if self._work is not None:
            self._work.wait()
            self._tensor.div_(self._world_size)
            self._work = None
        return self._tensor


class TorchDistCommunicator(Communicator):
    """:class:`Communicator` over ``torch.distributed`` (gloo or NCCL), optionally restricted to ``group``.

    Args:
        group: process group to average over; ``None`` is the default (world) group. Ranks in :meth:`exchange`
            are ranks *within* ``group``.
    """

    def __init__(self, group: Any = None) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def _global(self, peer: int) -> int:
        if self.group is None:
            return peer
        return self._dist.get_global_rank(self.group, peer)

    def all_reduce_mean_(self, tensor: Tensor) -> None:
        if self.world_size > 1:
            self._dist.all_reduce(tensor, group=self.group)
            tensor.div_(self.world_size)

    def all_reduce_mean_async(self, tensor: Tensor) -> PendingMean:
        if self.world_size == 1:
            return _DistPending(None, tensor, 1)
        work = self._dist.all_reduce(tensor, group=self.group, async_op=True)
        return _DistPending(work, tensor, self.world_size)

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        if self.world_size > 1:
            self._dist.all_reduce(tensor, group=self.group)
        return tensor

    def all_gather(self, tensor: Tensor) -> list[Tensor]:
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        self._dist.all_gather(out, tensor.contiguous(), group=self.group)
        return out

    def exchange(self, tensor: Tensor, peer: int) -> Tensor:
        out = torch.empty_like(tensor)
        send = self._dist.isend(tensor.contiguous(), self._global(peer), group=self.group)
        recv = self._dist.irecv(out, self._global(peer), group=self.group)
        send.wait()
        recv.wait()
        return out


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


def allreduce_bytes(nbytes: int, world_size: int) -> int:
    """Bytes all ranks together send for a ring all-reduce of ``nbytes`` per rank: ``2·(W−1)·nbytes``."""
    return 2 * (world_size - 1) * nbytes


@dataclass
class SyncStats:
    """What one synchronisation did.

    Attributes:
        bytes_sent: payload bytes all ranks together put on the wire for this round (ring all-reduce model:
            ``2·(W−1)·n``; point-to-point: the sum of what each rank sent).
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
    extra flat tensor (buffers, optimizer state) with the same communication pattern as the models.
    """

    name: str = "outer"

    def init_state(self, params: list[Tensor]) -> None:
        raise NotImplementedError

    def sync(self, params: list[Tensor], comm: Communicator, step: int) -> SyncStats:
        raise NotImplementedError

    def finalize(self, params: list[Tensor], comm: Communicator) -> SyncStats | None:
        """Apply anything still in flight (default: nothing)."""
        return None

    def average_(self, flat: Tensor, comm: Communicator, step: int) -> int:
        """Average ``flat`` in place across the replicas this method mixes; returns bytes sent (all ranks)."""
        comm.all_reduce_mean_(flat)
        return allreduce_bytes(flat.numel() * flat.element_size(), comm.world_size)

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    # helpers for subclasses
    def _check_version(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise RuntimeError(f"{type(self).__name__}: state `version` must be {STATE_VERSION}, got "
                               f"{state.get('version')!r}.")

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
