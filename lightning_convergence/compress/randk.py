"""Rand-K sparsification with indices drawn from a shared seed (only the values travel)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_convergence._checks import check_number
from lightning_convergence.compress.base import Compressor, Payload, generator_for

__all__ = ["RandK"]


class RandK(Compressor):
    """Keep ``k = ceil(k_fraction · d)`` entries chosen uniformly at random, the same ones on every rank.

    Paper: Stich, Cordonnier, Jaggi. *Sparsified SGD with Memory.* NeurIPS 2018, arXiv:1809.07599 (rand-k); the
    unbiased ``d/k`` scaling is the standard unbiased variant (e.g. Beznosikov et al., arXiv:2002.12410).

    The indices come from a generator seeded by ``(seed, step, parameter name)``, so every rank picks the same
    indices: only the ``k`` values go on the wire, and payloads can be summed by an all-reduce (``summable``). A
    resumed run replays the same draws.

    Properties: with ``rescale=True`` the compressor is unbiased, ``E[C(x)] = x``, with variance
    ``E||C(x) − x||² = (d/k − 1)·||x||²`` (not a contraction: ``alpha = 0``; pair it with no feedback, or with
    classic EF at small learning rates). With ``rescale=False`` it is a contraction in expectation,
    ``E||C(x) − x||² = (1 − k/d)·||x||²`` (``alpha = k_fraction``), biased by the factor k/d, which suits EF21.

    Args:
        k_fraction: share of entries kept per tensor, in (0, 1]. Default ``0.01``; the paper's k/d. Rand-K needs
            larger ``k_fraction`` than Top-K for the same loss (it ignores magnitudes).
        rescale: multiply kept values by ``d/k`` (unbiased). Default ``True``.
        seed: base seed of the shared index draws, any int. Default ``0``.

    Raises:
        ValueError: if ``k_fraction`` is outside (0, 1].

    Example::

        CompressedDDPStrategy(feedback="none", compressor=RandK(k_fraction=0.05, rescale=True))
    """

    summable = True

    def __init__(self, k_fraction: float = 0.01, rescale: bool = True, seed: int = 0) -> None:
        self.k_fraction = check_number("RandK", "k_fraction", k_fraction, 0, 1, low_open=True)
        self.rescale = bool(rescale)
        self.seed = int(seed)
        self.unbiased = self.rescale
        self.alpha = 0.0 if self.rescale else self.k_fraction

    def k_for(self, numel: int) -> int:
        return max(1, min(numel, math.ceil(self.k_fraction * numel)))

    def contraction(self, numel: int) -> float:
        return 0.0 if self.rescale else self.k_for(numel) / max(numel, 1)

    def indices(self, numel: int, step: int, key: str = "") -> Tensor:
        """The shared indices for this parameter and step (int64, on CPU)."""
        gen = generator_for(self.seed, step, key)
        return torch.randperm(numel, generator=gen)[: self.k_for(numel)]

    def compress(self, tensor: Tensor, step: int = 0, key: str = "") -> Payload:
        flat = tensor.reshape(-1)
        idx = self.indices(flat.numel(), step, key).to(flat.device)
        values = flat[idx]
        if self.rescale:
            values = values * (flat.numel() / idx.numel())
        return Payload({"values": values}, tensor.shape, tensor.dtype, self, meta={"indices": idx})

    def decompress(self, payload: Payload) -> Tensor:
        values = payload.tensors["values"]
        out = values.new_zeros(payload.numel)
        out[payload.meta["indices"]] = values
        return out.reshape(payload.shape)
