"""EF21-SGDM: EF21 on a Polyak (EMA) momentum of the stochastic gradients."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lightning_convergence._checks import check_number
from lightning_convergence.feedback.base import FeedbackRule, get_buffer
from lightning_convergence.feedback.ef21 import ef21_commit, ef21_server_step

__all__ = ["EF21SGDM", "ef21_sgdm_input", "ef21_sgdm_commit"]


def ef21_sgdm_input(
    v: dict[str, Tensor], g_i: dict[str, Tensor], key: str, grad: Tensor, momentum: float, dense_first_step: bool
) -> tuple[Tensor, Tensor] | None:
    """``(v_i − g_i, v_i)`` with the new ``v_i = (1−η) v_i + η ∇f_i`` (``v_i⁰ = ∇f_i(x⁰)``, ``g_i⁰ = 0``); ``None``
    for the first message when ``dense_first_step`` (the uncompressed gradient: ``v_i⁰ = g_i⁰ = ∇f_i(x⁰)``)."""
    old_v, old_g = get_buffer(v, key, grad), get_buffer(g_i, key, grad)
    if old_g is None and dense_first_step:
        return None
    new_v = grad.clone() if old_v is None else old_v.mul(1.0 - momentum).add_(grad, alpha=momentum)
    return (new_v if old_g is None else new_v - old_g), new_v


def ef21_sgdm_commit(v: dict[str, Tensor], g_i: dict[str, Tensor], key: str, new_v: Tensor, c: Tensor) -> Tensor:
    """``v_i ← new_v``, ``g_i ← g_i + c_i`` for this worker's decompressed message ``c_i``; returns ``v_i − g_i``."""
    v[key] = new_v
    return ef21_commit(g_i, key, new_v, c)


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
    server_buffers = ("g",)
    first_buffers = start_buffers = ("g_i", "v")

    def __init__(self, momentum: float = 0.1, dense_first_step: bool = True) -> None:
        super().__init__()
        self.momentum = check_number("EF21SGDM", "momentum", momentum, 0, 1, low_open=True)
        self.dense_first_step = bool(dense_first_step)

    def hparams(self) -> dict[str, Any]:
        return {"momentum": self.momentum, "dense_first_step": self.dense_first_step}

    def _inputs(self, key: str, x: Tensor) -> tuple[Tensor, Tensor] | None:
        b = self.buffers
        return ef21_sgdm_input(b["v"], b["g_i"], key, x, self.momentum, self.dense_first_step)

    def _commit(self, key: str, x: Tensor, inputs: tuple[Tensor, ...], delta: Tensor) -> Tensor:
        return ef21_sgdm_commit(self.buffers["v"], self.buffers["g_i"], key, inputs[1], delta)

    def update(self, key: str, mean: Tensor) -> Tensor:
        return ef21_server_step(self.buffers["g"], key, mean)
