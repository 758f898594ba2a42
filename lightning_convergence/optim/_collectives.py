"""The collectives an optimizer that owns its communication calls, and the link bytes each one costs per rank.

This is the one place where :class:`~lightning_convergence.optim.DeMo` and
:class:`~lightning_convergence.optim.OnebitAdam` touch ``torch.distributed``. The optimizers call three callables
(``all_gather``, ``all_to_all``, ``all_reduce_sum``) and never a process group, so tests pass fakes and the package's
common communication layer can replace :func:`dist_collectives` without touching the math.

Link bytes per rank are counted under each collective's real algorithm at the real world size ``W`` for a
per-rank input of ``n`` bytes: ring all-reduce ``2(W-1)/W * n``, all-gather ``(W-1) * n``, all-to-all
(reduce-scatter pattern, each rank keeps its own ``1/W``) ``(W-1)/W * n``. Imports torch only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Collectives", "dist_collectives", "local_collectives", "ring_all_reduce_bytes"]


def ring_all_reduce_bytes(nbytes: float, world_size: int) -> float:
    """Link bytes one rank sends in a ring all-reduce of ``nbytes`` (what DDP pays per step): ``2(W-1)/W * n``."""
    return 2.0 * (world_size - 1) / world_size * nbytes if world_size > 1 else 0.0


@dataclass
class Collectives:
    """Blocking collectives over one group, with a per-rank link-byte counter.

    Args:
        world_size: ranks in the group, ≥ 1.
        rank: this rank's index in the group.
        gather: ``t -> [t_0, ..., t_{W-1}]`` (every rank's tensor, rank order; same shape and dtype on every rank).
        all_to_all: ``t -> u`` where ``t`` has ``W`` equal rows and row ``r`` goes to rank ``r``; ``u``'s row ``r``
            came from rank ``r``.
        reduce_sum: ``t -> Σ_r t_r`` (in place allowed).

    State: ``link_bytes_total`` (bytes this rank has sent, by the formulas in the module docstring).
    """

    world_size: int = 1
    rank: int = 0
    gather: Callable[[Tensor], list[Tensor]] | None = None
    all_to_all: Callable[[Tensor], Tensor] | None = None
    reduce_sum: Callable[[Tensor], Tensor] | None = None
    link_bytes_total: float = field(default=0.0)

    def all_gather(self, t: Tensor) -> list[Tensor]:
        """Every rank's ``t``; counts ``(W-1) * nbytes(t)``."""
        if self.world_size == 1:
            return [t]
        self.link_bytes_total += (self.world_size - 1) * t.numel() * t.element_size()
        return self.gather(t)  # type: ignore[misc]

    def scatter_rows(self, t: Tensor) -> Tensor:
        """All-to-all of ``t``'s ``W`` rows; counts ``(W-1)/W * nbytes(t)``."""
        if self.world_size == 1:
            return t
        self.link_bytes_total += (self.world_size - 1) / self.world_size * t.numel() * t.element_size()
        return self.all_to_all(t)  # type: ignore[misc]

    def all_reduce(self, t: Tensor) -> Tensor:
        """Σ over ranks of ``t`` (ring); counts ``2(W-1)/W * nbytes(t)``."""
        if self.world_size == 1:
            return t
        self.link_bytes_total += ring_all_reduce_bytes(t.numel() * t.element_size(), self.world_size)
        return self.reduce_sum(t)  # type: ignore[misc]


def local_collectives() -> Collectives:
    """One process: every collective is the identity and costs nothing."""
    return Collectives()


def dist_collectives(group: object = None) -> Collectives:
    """Blocking ``torch.distributed`` collectives over ``group`` (gloo or NCCL; the default group when ``None``)."""
    world_size = dist.get_world_size(group)

    def gather(t: Tensor) -> list[Tensor]:
        out = [torch.empty_like(t) for _ in range(world_size)]
        dist.all_gather(out, t.contiguous(), group=group)
        return out

    def all_to_all(t: Tensor) -> Tensor:
        out = torch.empty_like(t)
        dist.all_to_all_single(out, t.contiguous(), group=group)
        return out

    def reduce_sum(t: Tensor) -> Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        return t

    return Collectives(world_size, dist.get_rank(group), gather, all_to_all, reduce_sum)
