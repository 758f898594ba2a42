"""Streaming DiLoCo's transport: link bytes per rank, the quantized chunk codec, and the collectives.

The one place that talks to ``torch.distributed`` (:class:`DistCollectives`; :class:`LocalCollectives` at world size
1). Their interface (``rank``, ``world_size``, ``all_reduce_sum_async``, ``all_to_all_async``, ``all_gather_async``,
each returning a ``torch.futures.Future``) is the common communication layer's, so its communicators fit in their
stead. Imports torch only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_convergence.compress.base import Payload
from lightning_convergence.compress.blockquant import BlockQuantizer

__all__ = ["DistCollectives", "LocalCollectives", "quantized_mean_link_bytes", "ring_all_reduce_link_bytes"]


# ---------------------------------------------------------------------------------------------------- link bytes
def ring_all_reduce_link_bytes(nbytes: int, world_size: int) -> int:
    """Bytes one rank sends in a ring all-reduce of ``nbytes``: ``2(W−1)/W · nbytes``."""
    return 0 if world_size <= 1 else 2 * (world_size - 1) * nbytes // world_size


def quantized_mean_link_bytes(numel: int, world_size: int, quantizer: BlockQuantizer) -> int:
    """Bytes one rank sends for the quantized mean of ``numel`` entries: all-to-all of ``W`` encoded chunks
    (reduce-scatter, ``(W−1)/W·B``) then all-gather of the encoded mean chunk (``(W−1)·B/W``): ``2(W−1)/W · B``."""
    if world_size <= 1:
        return 0
    chunk = chunk_len(numel, world_size, quantizer.block_size)
    return 2 * (world_size - 1) * quantizer.wire_bytes(chunk)


def chunk_len(numel: int, world_size: int, block: int) -> int:
    unit = world_size * block
    return (-(-numel // unit) * unit) // world_size


# ---------------------------------------------------------------------------------------------------- transport
def encode_chunk(q: BlockQuantizer, x: Tensor) -> Tensor:
    p = q.compress(x)
    return torch.cat([p.tensors["codes"].reshape(-1), p.tensors["scales"].reshape(-1).view(torch.uint8)])


def decode_chunk(q: BlockQuantizer, blob: Tensor, numel: int) -> Tensor:
    nblocks = numel // q.block_size
    ncodes = numel * q.bits // 8
    scales = blob[ncodes: ncodes + 4 * nblocks].clone().view(torch.float32)
    payload = Payload({"codes": blob[:ncodes], "scales": scales}, torch.Size([numel]), torch.float32, q)
    return q.decompress(payload)


def done(value: Tensor) -> torch.futures.Future:
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(value)
    return fut


class LocalCollectives:
    """World size 1: every collective returns its input."""

    rank, world_size = 0, 1

    def all_reduce_sum_async(self, t: Tensor) -> torch.futures.Future:
        return done(t)

    def all_to_all_async(self, t: Tensor) -> torch.futures.Future:
        return done(t)

    def all_gather_async(self, t: Tensor) -> torch.futures.Future:
        return done(t.reshape(-1))


class DistCollectives:
    """Asynchronous collectives over a ``torch.distributed`` group (gloo or NCCL): each returns a future at once.

    Args:
        group: the process group; pass a dedicated one (``dist.new_group()``) so the outer all-reduces in flight
            never queue behind, or in front of, the training loop's own collectives.
    """

    def __init__(self, group: Any = None) -> None:
        import torch.distributed as dist

        self._dist, self.group = dist, group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self._gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

    def _fut(self, work: Any, value: Tensor) -> torch.futures.Future:
        return work.get_future().then(lambda _: value)

    def all_reduce_sum_async(self, t: Tensor) -> torch.futures.Future:
        return self._fut(self._dist.all_reduce(t, group=self.group, async_op=True), t)

    def all_to_all_async(self, t: Tensor) -> torch.futures.Future:
        t = t.reshape(-1).contiguous()
        out = torch.empty_like(t)
        return self._fut(self._dist.all_to_all_single(out, t, group=self.group, async_op=True), out)

    def all_gather_async(self, t: Tensor) -> torch.futures.Future:
        t = t.reshape(-1).contiguous()
        out = t.new_empty(self.world_size * t.numel())
        return self._fut(self._gather(out, t, group=self.group, async_op=True), out)
