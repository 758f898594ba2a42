"""Link bytes: what one rank puts on its links for each collective, under the algorithm the backend runs.

Every count is *this rank's* bytes sent for a payload of ``nbytes`` bytes per rank at world size ``W`` (gloo and NCCL
run the same schedules for these collectives on one host):

* ring all-reduce (reduce-scatter then all-gather of ``W`` chunks): ``2(W−1)/W · nbytes``;
* all-gather (ring): ``(W−1) · nbytes`` (``nbytes`` is the per-rank contribution);
* all-to-all (pairwise) and reduce-scatter (ring): ``(W−1)/W · nbytes``;
* broadcast: the root's message reaches ``W−1`` ranks; gloo runs a binomial tree, so rank ``r`` sends
  ``nbytes`` once per child (:func:`broadcast_link_bytes`); the total over ranks is ``(W−1) · nbytes``;
* point-to-point: ``nbytes`` (:func:`point_to_point_link_bytes`);
* quantized mean (quantized reduce-scatter by all-to-all, then quantized all-gather): ``2(W−1)/W · B`` with ``B``
  the codec's wire bytes of the tensor padded to ``W`` whole blocks (:func:`quantized_mean_link_bytes`).

Plain DDP's cost at the same ``W`` is the ring all-reduce of the gradient bucket, so a compressed scheme's saving is
``ring_all_reduce(D) / ours`` at that ``W`` (never the payload ratio ``D/c``). Imports nothing but the standard
library.
"""

from __future__ import annotations

__all__ = [
    "all_gather_link_bytes",
    "all_reduce_link_bytes",
    "all_to_all_link_bytes",
    "broadcast_link_bytes",
    "ddp_link_bytes",
    "point_to_point_link_bytes",
    "quantized_mean_link_bytes",
    "quantized_padded_numel",
]


def all_reduce_link_bytes(nbytes: int, world_size: int) -> int:
    """Ring all-reduce: ``2(W−1)/W · nbytes`` (rounded down to whole bytes per chunk, as the chunks are sent)."""
    if world_size <= 1:
        return 0
    return 2 * (world_size - 1) * nbytes // world_size


def all_gather_link_bytes(nbytes: int, world_size: int) -> int:
    """Ring all-gather of ``nbytes`` per rank: every rank forwards ``W−1`` contributions."""
    return max(world_size - 1, 0) * nbytes


def all_to_all_link_bytes(nbytes: int, world_size: int) -> int:
    """All-to-all of a buffer of ``nbytes`` split into ``W`` equal chunks: ``(W−1)/W · nbytes`` (own chunk stays)."""
    if world_size <= 1:
        return 0
    return (world_size - 1) * nbytes // world_size


def broadcast_link_bytes(nbytes: int, world_size: int, rank: int, root: int) -> int:
    """Binomial-tree broadcast (gloo): ``nbytes`` times the number of children of ``rank`` in the tree rooted at
    ``root``. Summed over ranks this is ``(W−1) · nbytes``."""
    if world_size <= 1:
        return 0
    v = (rank - root) % world_size  # position relative to the root
    children, step = 0, 1
    while step < world_size:
        if v < step and v + step < world_size:
            children += 1
        step *= 2
    return children * nbytes


def ddp_link_bytes(nbytes: int, world_size: int) -> int:
    """What plain DDP sends for a gradient bucket of ``nbytes``: one ring all-reduce."""
    return all_reduce_link_bytes(nbytes, world_size)


def point_to_point_link_bytes(nbytes: int) -> int:
    """One send of ``nbytes`` to one peer: ``nbytes`` on the link (an exchange sends this once each way)."""
    return nbytes


def quantized_padded_numel(numel: int, world_size: int, block_size: int) -> int:
    """``numel`` rounded up to ``world_size`` chunks of whole ``block_size`` blocks (what the quantized mean sends)."""
    unit = max(world_size, 1) * block_size
    return -(-numel // unit) * unit


def quantized_mean_link_bytes(numel: int, world_size: int, bits: int = 8, block_size: int = 256) -> int:
    """Quantized reduce-scatter (all-to-all of ``W`` encoded chunks) then all-gather of the encoded mean chunk.

    Each of the two collectives sends ``(W−1)`` encoded chunks of ``c = padded/W`` entries, ``c·bits/8`` bytes of
    codes plus 4 bytes per block of scales: ``2(W−1)·(c·bits/8 + 4·c/block_size)``, i.e. ``2(W−1)/W · B``.
    """
    if world_size <= 1:
        return 0
    chunk = quantized_padded_numel(numel, world_size, block_size) // world_size
    chunk_bytes = chunk * bits // 8 + 4 * (chunk // block_size)
    return all_to_all_link_bytes(world_size * chunk_bytes, world_size) + all_gather_link_bytes(chunk_bytes,
                                                                                               world_size)
