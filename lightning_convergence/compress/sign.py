"""Scaled sign compression: one bit per entry plus one scale."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_convergence.compress.base import Compressor, Payload, pack_bits, unpack_bits

__all__ = ["ScaledSign"]


class ScaledSign(Compressor):
    """``C(x) = (||x||₁ / d) · sign(x)``: one bit per entry and one float32 scale per tensor.

    Paper: Karimireddy, Rebjock, Stich, Jaggi. *Error Feedback Fixes SignSGD and other Gradient Compression
    Schemes.* ICML 2019, arXiv:1901.09847 (the scaled sign with error feedback, EF-SignSGD). Background: Seide et al.
    *1-Bit Stochastic Gradient Descent*, Interspeech 2014; 1-bit Adam (Tang et al., arXiv:2102.02888) uses the same
    message.

    Contraction: ``||C(x) − x||² = (1 − ||x||₁²/(d·||x||²))·||x||²``, so the factor is at least ``1/d`` (it is large
    for dense, even gradients): :meth:`contraction` returns ``1/d``; :attr:`alpha` is 0 (no size-free bound). Biased.

    Wire format: ``ceil(d/8)`` bytes of packed sign bits (``sign(0)`` is sent as +) and 4 bytes of scale: a ratio of
    about 32 against float32.

    Args: none.

    Example::

        CompressedDDPStrategy(feedback="ef14", compressor=ScaledSign())
    """

    unbiased = False
    alpha = 0.0
    summable = False

    def contraction(self, numel: int) -> float:
        return 1.0 / max(numel, 1)

    def compress(self, tensor: Tensor, step: int = 0, key: str = "") -> Payload:
        flat = tensor.reshape(-1)
        scale = flat.abs().sum().float().reshape(1) / max(flat.numel(), 1)
        bits = pack_bits((flat < 0).to(torch.uint8), 1)
        return Payload({"scale": scale, "signs": bits}, tensor.shape, tensor.dtype, self)

    def decompress(self, payload: Payload) -> Tensor:
        neg = unpack_bits(payload.tensors["signs"], 1, payload.numel)
        scale = payload.tensors["scale"].reshape(())
        out = (1.0 - 2.0 * neg.to(scale.dtype)) * scale
        return out.reshape(payload.shape)
