"""Average compressed payloads over the ranks through a :class:`~lightning_convergence.comm.Communicator`.

Each payload travels by its compressor's transport (:attr:`Compressor.transport`):

* ``"all_reduce"`` (summable float payloads: Identity, Rand-K, float LowRank, cyclic Top-K values): one ring
  all-reduce of all of them, ``2(W−1)/W · c`` bytes per rank;
* ``"quantized_all_reduce"`` (summable payloads sent in 8 bits: ``LowRank(factor_bits=8)``): one 8-bit
  reduce-scatter + all-gather (:mod:`~lightning_convergence.comm.quantized`), ``2(W−1)/W · c/4`` bytes per rank;
* ``"all_gather"`` (payloads that cannot be summed: Top-K values + indices, sign bits, QSGD codes): one all-gather of
  their bytes, ``(W−1) · c`` per rank, and every rank decompresses every rank's payload in rank order (so replicas
  stay bit-identical).

A non-finite flag (a 0-dim float tensor on the payloads' device, 1 where this rank's gradients were not finite)
travels inside the same collective, so every rank learns the number of flagged ranks without a host sync. Every
payload of one call must have the same wire size on every rank (true for every compressor here). Imports torch only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_convergence.comm.communicator import Communicator, done
from lightning_convergence.comm.links import all_gather_link_bytes, all_reduce_link_bytes
from lightning_convergence.comm.quantized import BLOCK, quantized_link_bytes, quantized_mean_async
from lightning_convergence.compress.base import Compressor, Payload

__all__ = [
    "average_payloads", "average_payloads_async", "first_round", "link_bytes_per_rank", "payload_bytes",
    "payloads_from_bytes",
]


def payload_bytes(payloads: Sequence[Payload]) -> Tensor:
    """The wire tensors of ``payloads`` as one flat uint8 tensor (the all-gather message)."""
    parts = [t.detach().reshape(-1).contiguous().view(torch.uint8) for p in payloads for t in p.tensors.values()]
    return torch.cat(parts)


def payloads_from_bytes(blob: Tensor, templates: Sequence[Payload]) -> tuple[list[Payload], int]:
    """Payloads shaped like ``templates`` read back from ``blob``; returns them and the bytes consumed."""
    out, offset = [], 0
    for template in templates:
        tensors = {}
        for name, t in template.tensors.items():
            nb = t.numel() * t.element_size()
            tensors[name] = blob[offset : offset + nb].clone().view(t.dtype).reshape(t.shape)
            offset += nb
        out.append(template.replace(tensors))
    return out, offset


def link_bytes_per_rank(compressor: Compressor, shape: tuple[int, ...], world_size: int) -> int | None:
    """Link bytes one rank sends for one float32 tensor of ``shape`` under ``compressor``'s transport at
    ``world_size`` (single-round compressors; ``None`` for two-round ones, whose first round needs its partners)."""
    if compressor.rounds > 1:
        return None
    nbytes = compressor.compress(torch.zeros(shape), 0, "probe").nbytes
    if compressor.transport == "all_gather":
        return all_gather_link_bytes(nbytes, world_size)
    if compressor.transport == "quantized_all_reduce":
        return quantized_link_bytes(nbytes // 4, world_size)
    return all_reduce_link_bytes(nbytes, world_size)


def _flat_float(payloads: Sequence[Payload]) -> Tensor:
    parts = [t.reshape(-1) for p in payloads for t in p.tensors.values()]
    if len({t.dtype for t in parts}) != 1 or not parts[0].is_floating_point():
        raise RuntimeError("summable payloads must share one floating dtype.")
    return torch.cat(parts)


def _unflatten(flat: Tensor, payloads: Sequence[Payload]) -> list[Payload]:
    means, offset = [], 0
    for p in payloads:
        tensors = {}
        for name, t in p.tensors.items():
            tensors[name] = flat[offset : offset + t.numel()].reshape(t.shape).to(t.dtype)
            offset += t.numel()
        means.append(p.replace(tensors))
    return means


def _flag_block(flag: Tensor | None, like: Tensor, size: int) -> Tensor:
    out = like.new_zeros(size)
    if flag is not None:
        out[0] = flag
    return out


def _mean_summable_async(payloads: list[Payload], comm: Communicator, flag: Tensor | None,
                         quantized: bool) -> torch.futures.Future:
    """Future of ``(averaged payloads, flagged-rank count)`` for summable payloads (float or 8-bit transport)."""
    w = comm.world_size
    flat = _flat_float(payloads)
    n = flat.numel()
    extra = (BLOCK if quantized else 1) if flag is not None else 0
    if extra:
        flat = torch.cat([flat, _flag_block(flag, flat, extra)])
    if quantized:
        fut = quantized_mean_async(flat, comm)
    else:
        fut = comm.all_reduce_sum_async(flat.clone() if w > 1 else flat).then(lambda f: f.value().div_(w))

    def finish(f: torch.futures.Future) -> tuple[list[Payload], Tensor | None]:
        mean = f.value()
        count = (mean[n] * w).round() if extra else None
        return _unflatten(mean[:n], payloads), count

    return fut.then(finish)


def _gather_async(payloads: list[Payload], comm: Communicator, flag: Tensor | None) -> torch.futures.Future:
    """Future of ``(every rank's payloads in rank order, flagged-rank count)``."""
    blob = payload_bytes(payloads)
    if flag is not None:
        blob = torch.cat([blob, flag.reshape(1).float().view(torch.uint8)])
    size = blob.numel()

    def finish(f: torch.futures.Future) -> tuple[list[list[Payload]], Tensor | None]:
        blobs = f.value().reshape(comm.world_size, size)
        per_rank, flags = [], []
        for r in range(comm.world_size):
            if r == comm.rank:
                per_rank.append(payloads)
                theirs_end = size - (4 if flag is not None else 0)
            else:
                theirs, theirs_end = payloads_from_bytes(blobs[r], payloads)
                per_rank.append(theirs)
            if flag is not None:
                flags.append(blobs[r][theirs_end : theirs_end + 4].clone().view(torch.float32))
        count = torch.cat(flags).sum() if flags else None
        return per_rank, count

    return comm.all_gather_async(blob).then(finish)


def _add_counts(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


def average_payloads_async(
    payloads: Sequence[Payload], comm: Communicator, nonfinite: Tensor | None = None, decompress: bool = True,
    out: Sequence[Tensor] | None = None,
) -> torch.futures.Future:
    """Start ``(1/W) Σ_r decompress(payload_r)`` for each payload position; the future holds
    ``(means, flagged)``: the float32 means in input order and the number of ranks whose ``nonfinite`` flag was set
    (a 0-dim tensor; ``None`` when no flag was given).

    Compressors observe the averages on every rank (:meth:`Compressor.observe_means` /
    ``observe_gathered``) before the future completes; ``decompress=False`` (first rounds) leaves the means out;
    ``out`` (float32 tensors, one per payload, e.g. views of a DDP bucket) receives the means in place of new
    tensors. All collectives are issued before this returns (the 8-bit one waits for its all-to-all).
    """
    groups: dict[str, list[int]] = {"quantized_all_reduce": [], "all_reduce": [], "all_gather": []}
    for i, p in enumerate(payloads):
        groups[p.compressor.transport].append(i)
    futs, order, flag = [], [], nonfinite
    for transport, idx in groups.items():
        if not idx:
            continue
        chosen = [payloads[i] for i in idx]
        if transport == "all_gather":
            futs.append(_gather_async(chosen, comm, flag))
        else:
            futs.append(_mean_summable_async(chosen, comm, flag, transport == "quantized_all_reduce"))
        order.append((transport, idx))
        flag = None  # the flag rides in the first collective only
    if not futs:
        return done(([], None if nonfinite is None else nonfinite * 0))

    def into(i: int, mean: Tensor) -> Tensor:
        return mean if out is None else out[i].copy_(mean.reshape(out[i].shape))

    def finish(f: torch.futures.Future) -> tuple[list[Tensor], Tensor | None]:
        results: list[Tensor | None] = [None] * len(payloads)
        count = None
        for (transport, idx), sub in zip(order, f.value()):
            result, c = sub.value()
            count = _add_counts(count, c)
            if transport == "all_gather":
                for j, i in enumerate(idx):
                    theirs = [r[j] for r in result]
                    if decompress:
                        total = theirs[0].decompress().float().clone()
                        for t in theirs[1:]:
                            total.add_(t.decompress().float())
                        results[i] = into(i, total.div_(comm.world_size) if comm.world_size > 1 else total)
                    payloads[i].compressor.observe_gathered(theirs)
                continue
            if decompress:
                for i, mean in zip(idx, result):
                    c_ = mean.compressor
                    results[i] = c_.decompress(mean).float() if out is None else c_.decompress_into(mean, out[i])
            by_compressor: dict[int, list[Payload]] = {}
            for mean in result:
                by_compressor.setdefault(id(mean.compressor), []).append(mean)
            for means in by_compressor.values():
                means[0].compressor.observe_means(means)  # e.g. one batched QR per factor shape
        return results, count  # type: ignore[return-value]

    return torch.futures.collect_all(futs).then(finish)


def average_payloads(payloads: Sequence[Payload], comm: Communicator) -> list[Tensor]:
    """Blocking :func:`average_payloads_async` without a flag: the float32 means."""
    return average_payloads_async(payloads, comm).wait()[0]


def first_round(
    compressor: Compressor, items: Sequence[tuple[str, Tensor, int]], comm: Communicator,
    nonfinite: Tensor | None = None,
) -> None:
    """Round one of a two-round compressor (``compressor.rounds > 1``) for a whole bucket, blocking.

    ``items`` are ``(key, tensor, step)`` in the same order on every rank. ``compressor.first_round_transport``
    says how the messages of :meth:`Compressor.prepare` travel: ``"broadcast"`` (one rank, ``first_round_root``,
    picks for all: cyclic Top-K's indices; one broadcast per distinct root) handed to ``observe_broadcast``, or the
    compressor's own transport (averaged: ``observe_mean``; gathered: ``observe_gathered``). A rank whose gradients
    are not finite passes ``nonfinite`` = 1: its messages are zeroed (the collective still matches). The second
    round is the ordinary :meth:`Compressor.compress` + :func:`average_payloads_async`.
    """
    prepared = [(key, step, compressor.prepare(x, step, key)) for key, x, step in items]
    prepared = [(key, step, p) for key, step, p in prepared if p is not None]
    if not prepared:
        return
    if nonfinite is not None:
        keep = nonfinite == 0
        prepared = [(k, s, p.replace({n: torch.where(keep, t, torch.zeros_like(t)) for n, t in p.tensors.items()}))
                    for k, s, p in prepared]
    if compressor.first_round_transport == "broadcast":
        roots: dict[int, list[Payload]] = {}
        for _, step, p in prepared:
            roots.setdefault(compressor.first_round_root(step), []).append(p)
        for root, group in roots.items():
            blob = comm.broadcast(payload_bytes(group), root)
            for p in payloads_from_bytes(blob, group)[0]:
                compressor.observe_broadcast(p)
        return
    average_payloads_async([p for _, _, p in prepared], comm, decompress=False).wait()
