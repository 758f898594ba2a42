"""EF21: error feedback through a per-worker gradient estimate that moves by compressed corrections."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_convergence.compress.base import Compressor, Payload
from lightning_convergence.feedback.base import DENSE, FeedbackRule, get_buffer, zero_message

__all__ = ["EF21", "ef21_worker_step", "ef21_server_step"]


def ef21_worker_step(
    g_i: dict[str, Tensor], key: str, grad: Tensor, compressor: Compressor, step: int, dense_first_step: bool
) -> tuple[Payload, Tensor]:
    """Worker ``i``: ``c_i = C(∇f_i − g_i)``, ``g_i ← g_i + c_i``. Returns the message and ``∇f_i − g_i`` after.

    The first message for a parameter is the uncompressed gradient when ``dense_first_step`` (``g_i⁰ = ∇f_i(x⁰)``).
    """
    old = get_buffer(g_i, key, grad)
    if old is None and dense_first_step:
        g_i[key] = grad.clone()
        return DENSE.compress(grad, step, key), torch.zeros_like(grad)
    if old is None:
        old = torch.zeros_like(grad)
    payload = compressor.compress(grad - old, step, key)
    g_i[key] = old + payload.decompress().reshape(grad.shape).to(grad.dtype)
    return payload, grad - g_i[key]


def ef21_server_step(g: dict[str, Tensor], key: str, mean_correction: Tensor) -> Tensor:
    """``g ← g + (1/n) Σ_i c_i`` (``g = mean`` on the first step): the gradient the optimizer uses."""
    old = get_buffer(g, key, mean_correction)
    g[key] = mean_correction.clone() if old is None else old + mean_correction
    return g[key]


class EF21(FeedbackRule):
    """EF21 error feedback over any (contractive) compressor.

    Paper: Richtárik, Sokolov, Fatkhullin. *EF21: A New, Simpler, Theoretically Better, and Practically Faster Error
    Feedback.* NeurIPS 2021, arXiv:2106.05203, Algorithm 1 (checked against the authors' deep-learning code)::

        c_i = C(∇f_i(x) − g_i);   g_i ← g_i + c_i;   g ← g + (1/n) Σ_i c_i;   x ← x − γ g

    Only ``c_i`` is communicated. Every rank keeps ``g`` (identical on all ranks) and its own ``g_i``.

    Deviations: stochastic (minibatch) gradients replace ``∇f_i`` (the paper's EF21-SGD setting, as in its deep
    learning code). The step ``x ← x − γ g`` is done by the user's optimizer, which sees ``g`` as the gradient
    (with momentum or Adam on top, the method is EF21 + that optimizer). The first step sends the uncompressed
    gradient (``dense_first_step=True``, the paper's initialisation ``g_i⁰ = ∇f_i(x⁰)``).

    Args:
        dense_first_step: send each parameter's first gradient uncompressed (``g_i⁰ = ∇f_i(x⁰)``). Default
            ``True``. ``False`` starts from ``g_i⁰ = 0`` and compresses from the first step (slower start).

    State: per-parameter ``g_i`` (buffer ``g_i``) and ``g`` (buffer ``g``), by parameter name; per-parameter step
    counts (they seed random compressors); the non-finite skip count; a ``version`` key. The logged residual is
    ``||∇f_i − g_i||²`` after the update.

    Example::

        CompressedDDPStrategy(feedback=EF21(), compressor=TopK(k_fraction=0.01))
    """

    name = "ef21"
    buffer_names = ("g_i", "g")

    def __init__(self, dense_first_step: bool = True) -> None:
        super().__init__()
        self.dense_first_step = bool(dense_first_step)

    def hparams(self) -> dict[str, Any]:
        return {"dense_first_step": self.dense_first_step}

    def _message(self, key: str, x: Tensor, compressor: Compressor, step: int) -> Payload:
        payload, err = ef21_worker_step(self.buffers["g_i"], key, x, compressor, step, self.dense_first_step)
        self._set_residual(key, err)
        return payload

    def _skip(self, key: str, x: Tensor, compressor: Compressor, step: int) -> Payload:
        dense = key not in self.buffers["g_i"] and self.dense_first_step
        if key not in self.buffers["g_i"]:
            self.buffers["g_i"][key] = torch.zeros_like(x)  # keeps g = mean_i g_i on every rank
        return zero_message(compressor, x, step, key, dense)

    def compressor_input(self, key: str, grad: Tensor) -> Tensor | None:
        x = grad.detach().to(torch.float32)
        old = get_buffer(self.buffers["g_i"], key, x)
        if old is None:
            return None if self.dense_first_step else x
        return x - old

    def update(self, key: str, mean: Tensor) -> Tensor:
        return ef21_server_step(self.buffers["g"], key, mean)
