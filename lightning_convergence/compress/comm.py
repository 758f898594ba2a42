"""Average payloads across workers: summable ones by one all-reduce, the rest by one all-gather of their bytes.

The collectives are passed in as callables (``all_reduce_sum(t) -> t``, ``all_gather(t) -> [t_0, ..., t_{W-1}]``),
so tests can use fakes and the same code runs under a DDP comm hook on gloo or NCCL
(:func:`dist_collectives` builds the real ones). Every payload of one call must have the same wire size on every
rank (true for every compressor here: sizes depend only on the tensor's size).

Imports torch only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_convergence.compress.base import Compressor, Payload

__all__ = ["average_payloads", "first_round", "dist_collectives", "AllReduce", "AllGather"]

AllReduce = Callable[[Tensor], Tensor]
AllGather = Callable[[Tensor], list[Tensor]]


def dist_collectives(group: object = None) -> tuple[AllReduce, AllGather]:
    """Blocking ``torch.distributed`` all-reduce (sum) and all-gather over ``group`` (works on gloo and NCCL)."""

    def all_reduce(t: Tensor) -> Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        return t

    def all_gather(t: Tensor) -> list[Tensor]:
        out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
        dist.all_gather(out, t, group=group)
        return out

    return all_reduce, all_gather


def _to_bytes(payloads: Sequence[Payload]) -> Tensor:
    parts = [t.detach().reshape(-1).contiguous().view(torch.uint8) for p in payloads for t in p.tensors.values()]
    return torch.cat(parts)


def _from_bytes(blob: Tensor, template: Payload, offset: int) -> tuple[Payload, int]:
    tensors = {}
    for name, t in template.tensors.items():
        nb = t.numel() * t.element_size()
        tensors[name] = blob[offset : offset + nb].clone().view(t.dtype).reshape(t.shape)
        offset += nb
    return template.replace(tensors), offset


def _mean_summable(payloads: Sequence[Payload], world_size: int, all_reduce: AllReduce | None) -> list[Payload]:
    """The payloads averaged over the ranks, wire tensor by wire tensor, in one all-reduce."""
    parts = [t.reshape(-1) for p in payloads for t in p.tensors.values()]
    if len({t.dtype for t in parts}) != 1 or not parts[0].is_floating_point():
        raise RuntimeError("summable payloads must share one floating dtype.")
    flat = torch.cat(parts)
    if world_size > 1:
        flat = all_reduce(flat)  # type: ignore[misc]
    flat = flat / world_size
    means, offset = [], 0
    for p in payloads:
        tensors = {}
        for name, t in p.tensors.items():
            tensors[name] = flat[offset : offset + t.numel()].reshape(t.shape)
            offset += t.numel()
        means.append(p.replace(tensors))
    return means


def _gather(mine: list[Payload], world_size: int, all_gather: AllGather | None, rank: int) -> list[list[Payload]]:
    """Every rank's payloads (rank order; ours as they are), from one all-gather of their bytes."""
    if world_size == 1:
        return [mine]
    blobs = all_gather(_to_bytes(mine))  # type: ignore[misc]
    per_rank = []
    for r, blob in enumerate(blobs):
        if r == rank:
            per_rank.append(mine)
            continue
        theirs, offset = [], 0
        for template in mine:
            p, offset = _from_bytes(blob, template, offset)
            theirs.append(p)
        per_rank.append(theirs)
    return per_rank


def first_round(
    compressor: Compressor, items: Sequence[tuple[str, Tensor, int]], world_size: int, all_reduce: AllReduce | None,
    all_gather: AllGather | None = None, rank: int = 0,
) -> int:
    """Round one of a multi-round compressor (``compressor.rounds > 1``) for a whole bucket, in one collective.

    ``items`` are ``(key, tensor, step)`` in the same order on every rank (a rank with nothing to send passes
    zeros of the right shape, so the collective matches). Summable first rounds are averaged by one all-reduce and
    handed to ``compressor.observe_mean``; the others (quantised factors) are all-gathered and every rank's payloads
    go to ``compressor.observe_gathered``. The second round is then the ordinary :meth:`Compressor.compress` +
    :func:`average_payloads`. Returns the bytes this rank sent.
    """
    payloads = [p for p in (compressor.prepare(x, step, key) for key, x, step in items) if p is not None]
    if not payloads:
        return 0
    if compressor.summable:
        for mean in _mean_summable(payloads, world_size, all_reduce):
            compressor.observe_mean(mean)
    else:
        per_rank = _gather(payloads, world_size, all_gather, rank)
        for j in range(len(payloads)):
            compressor.observe_gathered([theirs[j] for theirs in per_rank])
    return sum(p.nbytes for p in payloads)


def average_payloads(
    payloads: Sequence[Payload], world_size: int, all_reduce: AllReduce | None, all_gather: AllGather | None,
    rank: int = 0,
) -> list[Tensor]:
    """``(1/W) Σ_r decompress(payload_r)`` for each payload position, in float32.

    Summable payloads (all their wire tensors must share one floating dtype) go into one all-reduce; the others are
    concatenated as bytes into one all-gather and every rank's payload is decompressed locally.
    """
    out: list[Tensor | None] = [None] * len(payloads)
    summ = [i for i, p in enumerate(payloads) if p.compressor.summable]
    gath = [i for i, p in enumerate(payloads) if not p.compressor.summable]
    if summ:
        for i, mean in zip(summ, _mean_summable([payloads[i] for i in summ], world_size, all_reduce)):
            out[i] = mean.decompress().float()
            payloads[i].compressor.observe_mean(mean)
    if gath:
        per_rank = _gather([payloads[i] for i in gath], world_size, all_gather, rank)
        for j, i in enumerate(gath):
            # the same summation order on every rank keeps the replicas bit-identical for any world size
            total = per_rank[0][j].decompress().float().clone()
            for theirs in per_rank[1:]:
                total.add_(theirs[j].decompress().float())
            out[i] = total.div_(world_size) if world_size > 1 else total
            payloads[i].compressor.observe_gathered([theirs[j] for theirs in per_rank])
    return out  # type: ignore[return-value]
