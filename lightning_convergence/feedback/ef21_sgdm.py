"""EF21-SGDM: EF21 on a Polyak (EMA) momentum of the stochastic gradients."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_convergence.compress.base import Compressor, Payload
from lightning_convergence.feedback.base import DENSE, FeedbackRule, check_eta, get_buffer, zero_message
from lightning_convergence.feedback.ef21 import ef21_server_step

__all__ = ["EF21SGDM", "ef21_sgdm_worker_step"]


def ef21_sgdm_worker_step(
    v: dict[str, Tensor], g_i: dict[str, Tensor], key: str, grad: Tensor, compressor: Compressor, step: int,
    momentum: float, dense_first_step: bool,
) -> tuple[Payload, Tensor]:
    """``v_i ← (1−η) v_i + η ∇f_i``, ``c_i = C(v_i − g_i)``, ``g_i ← g_i + c_i``. Returns the message, ``v_i − g_i``.

    The first call starts from ``v_i⁰ = ∇f_i(x⁰)`` (the paper's initialisation); with ``dense_first_step`` it also
    sets ``g_i⁰ = ∇f_i(x⁰)`` and sends it uncompressed, otherwise ``g_i⁰ = 0`` and the message is ``C(∇f_i(x⁰))``.
    """
    old_v, old_g = get_buffer(v, key, grad), get_buffer(g_i, key, grad)
    if old_g is None and dense_first_step:
        v[key], g_i[key] = grad.clone(), grad.clone()
        return DENSE.compress(grad, step, key), torch.zeros_like(grad)
    if old_g is None:
        old_g = torch.zeros_like(grad)
    v[key] = grad.clone() if old_v is None else old_v.mul(1.0 - momentum).add_(grad, alpha=momentum)
    payload = compressor.compress(v[key] - old_g, step, key)
    g_i[key] = old_g + payload.decompress().reshape(grad.shape).to(grad.dtype)
    return payload, v[key] - g_i[key]


class EF21SGDM(FeedbackRule):
    """EF21 with Polyak momentum on the workers' stochastic gradients.

    Paper: Fatkhullin, Tyurin, Richtárik. *Momentum Provably Improves Error Feedback!* NeurIPS 2023,
    arXiv:2305.15155 (EF21-SGDM)::

        v_i ← (1 − η) v_i + η ∇f_i(x; ξ_i);   c_i = C(v_i − g_i);   g_i ← g_i + c_i;   g ← g + (1/n) Σ_i c_i

    Checked line by line against the method's restatement (its Algorithm 2 without normalisation) in Khirirat et
    al. (Khirirat, Riabinin, Sadiev, Gorbunov, Richtárik), *Error Feedback under (L0,L1)-Smoothness:
    Normalization and Momentum*: ``v_i⁰ = ∇f_i(x⁰; ξ⁰)``, then
    every step ``v_i``, ``Δ_i = C(v_i − g_i)``, ``g_i += Δ_i``, ``x ← x − γ·mean g_i``; the order (optimizer step with
    ``g^t``, then the gradient at ``x^{t+1}``) is tested against a transcription on least squares. ``momentum = 1``
    gives EF21 exactly (tested). Deviations: with ``dense_first_step`` (default) the first step sends the
    uncompressed gradient and sets ``v_i⁰ = g_i⁰ = ∇f_i(x⁰)`` (the paper allows a larger initial batch for
    ``g_i⁰ = v_i⁰``); without it ``g_i⁰ = 0``. The double-momentum variant EF21-SGD2M is not implemented.

    Args:
        momentum: EMA weight ``η`` of the new gradient, in (0, 1]. Default ``0.1`` (an EMA with β = 0.9). The
            theory takes η small (of order the compression level); 1 disables momentum (EF21). If you also use SGD
            momentum in the optimizer, lower one of the two.
        dense_first_step: send each parameter's first gradient uncompressed. Default ``True``.

    State: per-parameter ``v_i`` (buffer ``v``), ``g_i`` and ``g``, by name; step counts; the skip count; a
    ``version`` key. The logged residual is ``||v_i − g_i||²``.

    Raises:
        ValueError: if ``momentum`` is outside (0, 1].

    Example::

        CompressedDDPStrategy(feedback=EF21SGDM(momentum=0.1), compressor=TopK(k_fraction=0.01))
    """

    name = "ef21_sgdm"
    buffer_names = ("v", "g_i", "g")

    def __init__(self, momentum: float = 0.1, dense_first_step: bool = True) -> None:
        super().__init__()
        self.momentum = check_eta("EF21SGDM", "momentum", momentum, low_open=True)
        self.dense_first_step = bool(dense_first_step)

    def hparams(self) -> dict[str, Any]:
        return {"momentum": self.momentum, "dense_first_step": self.dense_first_step}

    def _message(self, key: str, x: Tensor, compressor: Compressor, step: int) -> Payload:
        b = self.buffers
        payload, err = ef21_sgdm_worker_step(
            b["v"], b["g_i"], key, x, compressor, step, self.momentum, self.dense_first_step
        )
        self._set_residual(key, err)
        return payload

    def _skip(self, key: str, x: Tensor, compressor: Compressor, step: int) -> Payload:
        first = key not in self.buffers["g_i"]
        if first:
            self.buffers["g_i"][key] = torch.zeros_like(x)
            self.buffers["v"][key] = torch.zeros_like(x)
        return zero_message(compressor, x, step, key, dense=first and self.dense_first_step)

    def compressor_input(self, key: str, grad: Tensor) -> Tensor | None:
        x = grad.detach().to(torch.float32)
        old_v, old_g = get_buffer(self.buffers["v"], key, x), get_buffer(self.buffers["g_i"], key, x)
        if old_g is None and self.dense_first_step:
            return None
        v = x if old_v is None else old_v.mul(1.0 - self.momentum).add_(x, alpha=self.momentum)
        return v if old_g is None else v - old_g

    def update(self, key: str, mean: Tensor) -> Tensor:
        return ef21_server_step(self.buffers["g"], key, mean)
