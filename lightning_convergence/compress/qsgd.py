"""QSGD stochastic quantisation (TernGrad with one level and the max norm)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_convergence._checks import check_choice, check_int
from lightning_convergence.compress.base import Compressor, Payload, generator_for, pack_bits, unpack_bits

__all__ = ["QSGD"]

_NORMS = ("l2", "max")


class QSGD(Compressor):
    """Unbiased stochastic quantisation to ``levels`` magnitude levels per sign, scaled by the tensor's norm.

    ``C(x)_j = ||x|| · sign(x_j) · ξ_j / s`` where ``ξ_j`` rounds ``s·|x_j|/||x||`` up or down at random so that
    ``E[ξ_j] = s·|x_j|/||x||`` (unbiased).

    Paper: Alistarh, Grubic, Li, Tomioka, Vojnovic. *QSGD: Communication-Efficient SGD via Gradient Quantization and
    Encoding.* NeurIPS 2017, arXiv:1610.02132 (``s`` = ``levels``, l2 norm). With ``levels=1`` and ``norm="max"`` it is
    TernGrad (Wen et al. *TernGrad: Ternary Gradients to Reduce Communication*, NeurIPS 2017, arXiv:1705.07878),
    without TernGrad's gradient clipping.

    Variance: ``E||C(x) − x||² ≤ min(d/s², √d/s)·||x||²`` for the l2 norm (QSGD Lemma 3.1); not a contraction
    (``alpha = 0``).

    Wire format: one float32 norm plus ``2·levels + 1`` codes per entry packed into 2, 4 or 8 bits (ternary: 2 bits,
    ``levels ≤ 7``: 4 bits, ``levels ≤ 127``: 8 bits). Deviation: no Elias coding of the levels (fixed-size codes keep
    every rank's payload the same size, so payloads are all-gathered without a size exchange).

    Randomness: the rounding draws come from a generator seeded by ``(seed, step, parameter name)``.

    Args:
        levels: number of magnitude levels ``s`` per sign, an int in [1, 127]. Default ``1`` (ternary). 127 gives
            8-bit codes.
        norm: ``"l2"`` (QSGD) or ``"max"`` (TernGrad; lower variance per level). Default ``"l2"``.
        seed: base seed of the rounding draws. Default ``0``.

    Raises:
        ValueError: if ``levels`` is outside [1, 127] or ``norm`` is unknown.
        TypeError: if ``levels`` is not an int.

    Example::

        CompressedDDPStrategy(feedback="ef14", compressor=QSGD(levels=7))
    """

    unbiased = True
    alpha = 0.0
    summable = False

    def __init__(self, levels: int = 1, norm: str = "l2", seed: int = 0) -> None:
        self.levels = check_int("QSGD", "levels", levels, 1, 127)
        self.norm = check_choice("QSGD", "norm", norm, _NORMS)
        self.seed = int(seed)
        needed = math.ceil(math.log2(2 * levels + 1))
        self._bits = next(b for b in (2, 4, 8) if b >= needed)

    @property
    def bits_per_entry(self) -> int:
        return self._bits

    def variance_bound(self, numel: int) -> float:
        """``omega`` with ``E||C(x) − x||² ≤ omega·||x||²`` (l2 norm; the max norm is tighter)."""
        return min(numel / self.levels**2, math.sqrt(numel) / self.levels)

    def compress(self, tensor: Tensor, step: int = 0, key: str = "") -> Payload:
        flat = tensor.reshape(-1).float()
        scale = flat.abs().max() if self.norm == "max" else flat.norm()
        scale = scale.reshape(1)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        level = flat.abs() / safe * self.levels
        low = level.floor()
        gen = generator_for(self.seed, step, key)
        u = torch.rand(flat.numel(), generator=gen).to(flat.device)
        xi = low + (u < (level - low)).to(level.dtype)
        codes = (torch.sign(flat) * xi).to(torch.int64) + self.levels  # in [0, 2s]
        return Payload({"scale": scale, "codes": pack_bits(codes, self._bits)}, tensor.shape, tensor.dtype, self)

    def decompress(self, payload: Payload) -> Tensor:
        scale = payload.tensors["scale"].reshape(())
        codes = unpack_bits(payload.tensors["codes"], self._bits, payload.numel) - self.levels
        return (codes.to(scale.dtype) * (scale / self.levels)).reshape(payload.shape)
