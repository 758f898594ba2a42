"""The one communication layer: collectives that count the link bytes this rank sends.

Every core that talks to other ranks (compressed DDP, the local-SGD family, federated rounds, statistics reductions)
is handed a :class:`Communicator` instead of a process group, so tests can pass a fake and the same core runs under
a DDP comm hook, a local-SGD strategy or a simulation. :class:`TorchDistCommunicator` runs the real collectives
(gloo or NCCL) and adds to :attr:`Communicator.link_bytes_total`, at issue time, what the collective's algorithm
makes *this* rank send (:mod:`lightning_convergence.comm.links`); :class:`SingleProcessCommunicator` is world size
1 (every collective is the identity, nothing is sent).

Asynchronous variants return a ``torch.futures.Future`` (DDP comm hooks chain them with ``.then()``). A collective
must be issued in the same order on every rank: issue them from one thread (never from a future's callback).
Imports torch only.
"""

from __future__ import annotations

import pickle
from typing import Any, Protocol

import torch
from torch import Tensor

from lightning_convergence.comm.links import (
    all_gather_link_bytes,
    all_reduce_link_bytes,
    all_to_all_link_bytes,
    broadcast_link_bytes,
    point_to_point_link_bytes,
)

__all__ = ["Communicator", "PendingMean", "SingleProcessCommunicator", "TorchDistCommunicator", "done"]


class PendingMean(Protocol):
    """A mean in flight (an ``async_op`` all-reduce): :meth:`wait` returns the averaged tensor."""

    def wait(self) -> Tensor: ...


def done(value: Any) -> torch.futures.Future:
    """A future that already holds ``value``."""
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(value)
    return fut


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


class Communicator:
    """What a core may ask of the network. Subclass it for fakes in tests.

    A subclass implements :meth:`all_reduce_mean_` (or :meth:`all_reduce_sum_async`), :meth:`all_gather` (or
    :meth:`all_gather_async`), and whichever of :meth:`all_to_all_async`, :meth:`broadcast_async` and
    :meth:`exchange` its cores use; the other forms default to these.

    Attributes:
        rank: this process's rank in the group.
        world_size: processes in the group.
        backend: ``"gloo"``, ``"nccl"`` or ``"local"`` (no process group).
        link_bytes_total: bytes this rank has sent so far, counted under each collective's real algorithm.
    """

    rank: int = 0
    world_size: int = 1
    backend: str = "local"
    link_bytes_total: int = 0

    # -- the primitives ----------------------------------------------------------------------------------------
    def all_reduce_mean_(self, tensor: Tensor) -> None:
        """Replace ``tensor`` by its mean over all ranks, in place."""
        raise NotImplementedError

    def all_gather(self, tensor: Tensor) -> list[Tensor]:
        """Every rank's ``tensor`` (same shape everywhere), ordered by rank."""
        raise NotImplementedError

    def exchange(self, tensor: Tensor, peer: int) -> Tensor:
        """Send ``tensor`` to ``peer`` and return the tensor ``peer`` sent back (point-to-point)."""
        raise NotImplementedError

    def all_to_all_async(self, tensor: Tensor) -> torch.futures.Future:
        """Start an all-to-all of a 1-D ``tensor`` split into ``W`` equal chunks: chunk ``j`` goes to rank ``j``; the
        future holds the ``W`` chunks received, concatenated in rank order."""
        raise NotImplementedError

    def broadcast_async(self, tensor: Tensor, root: int) -> torch.futures.Future:
        """Start broadcasting ``root``'s ``tensor`` (in place on the others); the future holds ``tensor``."""
        raise NotImplementedError

    # -- derived forms -----------------------------------------------------------------------------------------
    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """The sum of ``tensor`` over all ranks (in place; returned). Default: the mean times ``world_size``."""
        self.all_reduce_mean_(tensor)
        return tensor.mul_(self.world_size)

    def all_reduce_sum_async(self, tensor: Tensor) -> torch.futures.Future:
        """Start summing ``tensor`` over the ranks in place; the future holds ``tensor``. Default: blocking."""
        return done(self.all_reduce_sum(tensor))

    def all_reduce_mean_async(self, tensor: Tensor) -> PendingMean:
        """Start averaging ``tensor`` (owned by the callee until :meth:`PendingMean.wait`) without blocking."""
        return _PendingMean(self.all_reduce_sum_async(tensor) if self.world_size > 1 else None, tensor,
                            self.world_size)

    def all_gather_async(self, tensor: Tensor) -> torch.futures.Future:
        """Start gathering every rank's 1-D ``tensor``; the future holds one flat tensor of ``W·n`` entries in rank
        order. Default: blocking, through :meth:`all_gather`."""
        return done(torch.cat([t.reshape(-1) for t in self.all_gather(tensor)]))

    def all_to_all(self, tensor: Tensor) -> Tensor:
        """Blocking :meth:`all_to_all_async`."""
        return self.all_to_all_async(tensor).wait()

    def all_reduce_mean_flat_(self, tensors: list[Tensor]) -> None:
        """Average ``tensors`` over the ranks in place through one flat buffer: flatten, one all-reduce, copy back.

        The buffer takes the promoted dtype of ``tensors`` (each is cast back on copy). Nothing happens at world size
        1 or for an empty list.
        """
        if self.world_size == 1 or not tensors:
            return
        flat = torch.cat([t.detach().reshape(-1) for t in tensors])
        self.all_reduce_mean_(flat)
        with torch.no_grad():
            torch._foreach_copy_(tensors, [c.view_as(t) for c, t in zip(flat.split([t.numel() for t in tensors]),
                                                                        tensors)])

    def broadcast_flat_(self, tensors: list[Tensor], root: int = 0) -> None:
        """Overwrite ``tensors`` on every rank with ``root``'s, in place, through one flat buffer per dtype."""
        if self.world_size == 1 or not tensors:
            return
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for t in tensors:  # one buffer per dtype, so integer buffers travel exactly
            by_dtype.setdefault(t.dtype, []).append(t)
        for group in by_dtype.values():
            flat = torch.cat([t.detach().reshape(-1) for t in group])
            self.broadcast(flat, root)
            with torch.no_grad():
                torch._foreach_copy_(group, [c.view_as(t) for c, t in zip(flat.split([t.numel() for t in group]),
                                                                          group)])

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's picklable ``obj``, ordered by rank (checkpoint-time use; never on a per-step path)."""
        raise NotImplementedError

    def broadcast(self, tensor: Tensor, root: int) -> Tensor:
        self.broadcast_async(tensor, root).wait()
        return tensor


class _PendingMean:
    def __init__(self, fut: torch.futures.Future | None, tensor: Tensor, world_size: int) -> None:
        self._fut, self._tensor, self._world_size = fut, tensor, world_size

    def wait(self) -> Tensor:
        if self._fut is not None:
            self._fut.wait()
            self._tensor.div_(self._world_size)
            self._fut = None
        return self._tensor


class SingleProcessCommunicator(Communicator):
    """World size 1 without a process group: every collective returns its input and nothing is sent."""

    def all_reduce_mean_(self, tensor: Tensor) -> None:
        return None

    def all_gather(self, tensor: Tensor) -> list[Tensor]:
        return [tensor]

    def all_reduce_sum_async(self, tensor: Tensor) -> torch.futures.Future:
        return done(tensor)

    def all_gather_async(self, tensor: Tensor) -> torch.futures.Future:
        return done(tensor.reshape(-1))

    def all_to_all_async(self, tensor: Tensor) -> torch.futures.Future:
        return done(tensor)

    def broadcast_async(self, tensor: Tensor, root: int) -> torch.futures.Future:
        return done(tensor)

    def exchange(self, tensor: Tensor, peer: int) -> Tensor:  # pragma: no cover - never paired alone
        return tensor

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]


class TorchDistCommunicator(Communicator):
    """:class:`Communicator` over ``torch.distributed`` (gloo or NCCL), optionally restricted to ``group``.

    Args:
        group: process group; ``None`` is the default (world) group. Ranks in :meth:`exchange` and
            :meth:`broadcast_async` are ranks *within* ``group``.

    Paper: none (plumbing); link-byte formulas in :mod:`lightning_convergence.comm.links`.

    State: ``link_bytes_total`` only, a counter of this process's sends; the parts that report it keep their own
    checkpointed totals (a communicator is rebuilt at every setup).
    """

    def __init__(self, group: Any = None) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group)).lower()
        self.link_bytes_total = 0
        # torch ≥ 2.13 renamed the tensor-in/tensor-out collectives; older versions (the GPU image's 2.11) lack them
        self._gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

    def _global(self, peer: int) -> int:
        return peer if self.group is None else self._dist.get_global_rank(self.group, peer)

    def _future(self, work: Any, value: Any) -> torch.futures.Future:
        return work.get_future().then(lambda _: value)

    def all_reduce_sum_async(self, tensor: Tensor) -> torch.futures.Future:
        if self.world_size == 1:
            return done(tensor)
        self.link_bytes_total += all_reduce_link_bytes(_nbytes(tensor), self.world_size)
        return self._future(self._dist.all_reduce(tensor, group=self.group, async_op=True), tensor)

    def all_reduce_mean_(self, tensor: Tensor) -> None:
        if self.world_size > 1:
            self.all_reduce_sum_async(tensor).wait()
            tensor.div_(self.world_size)

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        self.all_reduce_sum_async(tensor).wait()
        return tensor

    def all_gather(self, tensor: Tensor) -> list[Tensor]:
        flat = self.all_gather_async(tensor).wait()
        return [c.reshape(tensor.shape) for c in flat.chunk(self.world_size)]

    def all_gather_async(self, tensor: Tensor) -> torch.futures.Future:
        tensor = tensor.reshape(-1).contiguous()
        if self.world_size == 1:
            return done(tensor)
        out = tensor.new_empty(self.world_size * tensor.numel())
        self.link_bytes_total += all_gather_link_bytes(_nbytes(tensor), self.world_size)
        return self._future(self._gather_into(out, tensor, group=self.group, async_op=True), out)

    def all_to_all_async(self, tensor: Tensor) -> torch.futures.Future:
        tensor = tensor.reshape(-1).contiguous()
        if self.world_size == 1:
            return done(tensor)
        out = torch.empty_like(tensor)
        self.link_bytes_total += all_to_all_link_bytes(_nbytes(tensor), self.world_size)
        return self._future(self._dist.all_to_all_single(out, tensor, group=self.group, async_op=True), out)

    def broadcast_async(self, tensor: Tensor, root: int) -> torch.futures.Future:
        if self.world_size == 1:
            return done(tensor)
        self.link_bytes_total += broadcast_link_bytes(_nbytes(tensor), self.world_size, self.rank, root)
        work = self._dist.broadcast(tensor, src=self._global(root), group=self.group, async_op=True)
        return self._future(work, tensor)

    def exchange(self, tensor: Tensor, peer: int) -> Tensor:
        out = torch.empty_like(tensor)
        self.link_bytes_total += point_to_point_link_bytes(_nbytes(tensor))
        send = self._dist.isend(tensor.contiguous(), self._global(peer), group=self.group)
        recv = self._dist.irecv(out, self._global(peer), group=self.group)
        send.wait()
        recv.wait()
        return out

    def all_gather_object(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        # torch pickles ``obj`` into a byte tensor, gathers the sizes (8 bytes each), pads to the largest and gathers
        self.link_bytes_total += all_gather_link_bytes(8 + len(pickle.dumps(obj)), self.world_size)
        out: list[Any] = [None] * self.world_size
        self._dist.all_gather_object(out, obj, group=self.group)
        return out
