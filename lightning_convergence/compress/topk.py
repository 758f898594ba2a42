"""Top-K sparsification: keep the k entries of largest magnitude."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_convergence._checks import check_number
from lightning_convergence.compress.base import Compressor, Payload

__all__ = ["TopK", "index_dtype"]


def index_dtype(numel: int) -> torch.dtype:
    """int32 indices when they fit (4 bytes on the wire instead of 8), else int64."""
    return torch.int32 if numel < 2**31 else torch.int64


class TopK(Compressor):
    """Keep the ``k = ceil(k_fraction · d)`` entries of largest magnitude of each tensor, zero the rest.

    Paper: the biased contractive compressor of Stich, Cordonnier, Jaggi. *Sparsified SGD with Memory.* NeurIPS 2018,
    arXiv:1809.07599; the compressor of EF21's deep-learning experiments (Richtárik, Sokolov, Fatkhullin,
    arXiv:2106.05203).

    Contraction: ``||C(x) − x||² ≤ (1 − k/d)·||x||²`` deterministically, so ``alpha = k_fraction`` (k is rounded up).
    Biased: it needs error feedback (EF14, EF21, EControl) to converge in general.

    Wire format: ``k`` values in the input dtype plus ``k`` indices (int32 below 2³¹ entries), all-gathered. For
    float32 gradients that is ``8k`` bytes instead of ``4d``: a ratio of ``1/(2·k_fraction)``.

    Deviations: exact ``torch.topk`` per tensor (no sampled threshold); ties broken by ``torch.topk``.

    Args:
        k_fraction: share of entries kept per tensor, in (0, 1]. Default ``0.01``; the paper's k/d. Start at 0.01,
            then halve while the loss gap to plain DDP stays within tolerance; with EF21, small k needs more steps.

    Raises:
        ValueError: if ``k_fraction`` is outside (0, 1].

    Example::

        CompressedDDPStrategy(feedback="ef21", compressor=TopK(k_fraction=0.01))
    """

    unbiased = False
    summable = False

    def __init__(self, k_fraction: float = 0.01) -> None:
        self.k_fraction = check_number("TopK", "k_fraction", k_fraction, 0, 1, low_open=True)
        self.alpha = self.k_fraction

    def k_for(self, numel: int) -> int:
        return max(1, min(numel, math.ceil(self.k_fraction * numel)))

    def contraction(self, numel: int) -> float:
        return self.k_for(numel) / max(numel, 1)

    def compress(self, tensor: Tensor, step: int = 0, key: str = "") -> Payload:
        flat = tensor.reshape(-1)
        k = self.k_for(flat.numel())
        _, idx = torch.topk(flat.abs(), k, sorted=False)
        return Payload(
            {"values": flat[idx], "indices": idx.to(index_dtype(flat.numel()))}, tensor.shape, tensor.dtype, self
        )

    def decompress(self, payload: Payload) -> Tensor:
        values = payload.tensors["values"]
        out = values.new_zeros(payload.numel)
        out.index_put_((payload.tensors["indices"].to(torch.int64),), values, accumulate=True)
        return out.reshape(payload.shape)
