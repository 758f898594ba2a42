"""EF21: error feedback through a per-worker gradient estimate that moves by compressed corrections."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lightning_convergence.feedback.base import FeedbackRule, get_buffer

__all__ = ["EF21", "ef21_input", "ef21_commit", "ef21_server_step"]


def ef21_input(g_i: dict[str, Tensor], key: str, grad: Tensor, dense_first_step: bool) -> Tensor | None:
    """The compressor's input ``∇f_i − g_i`` (``g_i = 0`` before the first message); ``None`` for the first message
    when ``dense_first_step`` (it is the uncompressed gradient, ``g_i⁰ = ∇f_i(x⁰)``)."""
    old = get_buffer(g_i, key, grad)
    if old is None:
        return None if dense_first_step else grad
    return grad - old


def ef21_commit(g_i: dict[str, Tensor], key: str, grad: Tensor, c: Tensor) -> Tensor:
    """``g_i ← g_i + c_i`` for this worker's decompressed message ``c_i``; returns ``∇f_i − g_i`` after."""
    old = get_buffer(g_i, key, grad)
    g_i[key] = c.clone() if old is None else old + c  # never an alias of the message or the gradient
    return grad - g_i[key]


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
    server_buffers = ("g",)
    first_buffers = start_buffers = ("g_i",)

    def __init__(self, dense_first_step: bool = True) -> None:
        super().__init__()
        self.dense_first_step = bool(dense_first_step)

    def hparams(self) -> dict[str, Any]:
        return {"dense_first_step": self.dense_first_step}

    def _inputs(self, key: str, x: Tensor) -> tuple[Tensor] | None:
        p = ef21_input(self.buffers["g_i"], key, x, self.dense_first_step)
        return None if p is None else (p,)

    def _commit(self, key: str, x: Tensor, inputs: tuple[Tensor, ...], delta: Tensor) -> Tensor:
        return ef21_commit(self.buffers["g_i"], key, x, delta)

    def update(self, key: str, mean: Tensor) -> Tensor:
        return ef21_server_step(self.buffers["g"], key, mean)
