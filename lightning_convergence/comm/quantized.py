"""Quantized mean of a float tensor over the ranks: 8-bit reduce-scatter by all-to-all, then 8-bit all-gather.

The transport ZeRO++ calls qgZ (Wang et al. *ZeRO++: Extremely Efficient Collective Communication for Giant Model
Training.* arXiv:2306.10209), here with one hop: every rank splits its flat float tensor into ``W``
chunks, rounds each block of :data:`BLOCK` entries to int8 with a float32 scale (``max|block| / 127``), and sends
chunk ``j`` to rank ``j`` (all-to-all); rank ``j`` decodes the ``W`` copies of its chunk, sums them in rank order in
float32, divides by ``W``, rounds the mean to int8 blocks again and all-gathers it. Every rank decodes the same
gathered codes, so the result is bit-identical on all ranks.

Link bytes per rank: ``2(W−1)/W · n·(1 + 4/BLOCK)`` for ``n`` entries (padded to a multiple of ``W·BLOCK``), against
``2(W−1)/W · 4n`` for a float32 ring all-reduce: about 3.9x fewer at every ``W``. (An all-gather of int8 codes sends
``(W−1)·n``, which saves ``8/W``: nothing at 8 ranks.) Two roundings: each rank's contribution and the mean; each is
at most half a step of ``max|block|/127``. Imports torch only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_convergence.comm.communicator import Communicator, done
from lightning_convergence.comm.links import all_gather_link_bytes, all_to_all_link_bytes

__all__ = ["BLOCK", "quantized_mean_async", "quantized_link_bytes", "encode_int8", "decode_int8"]

BLOCK = 256  # entries per float32 scale: 4/256 = 1.6% overhead on the int8 codes


def encode_int8(x: Tensor) -> Tensor:
    """``x`` (1-D, length a multiple of :data:`BLOCK`) as bytes: int8 codes, then one float32 scale per block."""
    blocks = x.float().reshape(-1, BLOCK)
    scale = blocks.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(blocks / scale.unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
    return torch.cat([codes.reshape(-1).view(torch.uint8), scale.view(torch.uint8)])


def decode_int8(blob: Tensor, numel: int) -> Tensor:
    """Inverse of :func:`encode_int8` for ``numel`` entries (float32)."""
    codes = blob[:numel].view(torch.int8).float().reshape(-1, BLOCK)
    scale = blob[numel:].contiguous().view(torch.float32)
    return (codes * scale.unsqueeze(1)).reshape(-1)


def _padded(numel: int, world_size: int) -> int:
    unit = world_size * BLOCK
    return -(-numel // unit) * unit


def quantized_link_bytes(numel: int, world_size: int) -> int:
    """Bytes this rank sends in :func:`quantized_mean_async` for ``numel`` entries."""
    if world_size <= 1:
        return 0
    n = _padded(numel, world_size)
    per_entry = n + 4 * (n // BLOCK)
    return all_to_all_link_bytes(per_entry, world_size) + all_gather_link_bytes(per_entry // world_size, world_size)


def quantized_mean_async(flat: Tensor, comm: Communicator) -> torch.futures.Future:
    """Start the 8-bit mean of the 1-D float ``flat`` over ``comm``'s ranks; the future holds the float32 mean.

    The all-to-all is waited for here (the all-gather's input depends on it, and collectives are issued from the
    calling thread only); the all-gather is left in flight. At world size 1 the mean is ``flat`` (no rounding).
    """
    w, numel = comm.world_size, flat.numel()
    if w == 1:
        return done(flat.float())
    n = _padded(numel, w)
    x = torch.zeros(n, dtype=torch.float32, device=flat.device)
    x[:numel] = flat
    chunk = n // w
    blobs = torch.cat([encode_int8(c) for c in x.split(chunk)])  # per destination: codes then scales
    received = comm.all_to_all_async(blobs).wait()
    mine = torch.stack([decode_int8(b, chunk) for b in received.chunk(w)])
    mean_chunk = mine.sum(dim=0).div_(w)  # the same rank order everywhere
    gathered = comm.all_gather_async(encode_int8(mean_chunk))

    def decode(fut: torch.futures.Future) -> Tensor:
        return torch.cat([decode_int8(b, chunk) for b in fut.value().chunk(w)])[:numel]

    return gathered.then(decode)
