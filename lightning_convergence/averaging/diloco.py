"""DiLoCo's outer step: Nesterov SGD on the averaged pseudo-gradient ``θ_anchor − mean_i θ_i``.

Imports torch only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_convergence._checks import check_number
from lightning_convergence.averaging.base import (
    STATE_VERSION,
    Communicator,
    OuterStep,
    SyncStats,
    finite,
    flatten,
    sqn,
    unflatten_into,
)
from lightning_convergence.compress.base import Compressor
from lightning_convergence.feedback.ef14 import ef14_commit, ef14_input

__all__ = ["DiLoCo", "nesterov_outer_update"]


def nesterov_outer_update(
    anchor: Tensor, buf: Tensor, delta: Tensor, lr: float, momentum: float, nesterov: bool = True
) -> None:
    """torch ``SGD(lr, momentum, nesterov, dampening=0)`` on gradient ``delta``, in place on ``anchor``/``buf``.

    ``b ← μ·b + Δ``; ``d = Δ + μ·b`` (Nesterov) or ``d = b`` (heavy ball); ``θ ← θ − lr·d``.
    """
    buf.mul_(momentum).add_(delta)
    direction = delta.add(buf, alpha=momentum) if nesterov else buf
    anchor.sub_(direction, alpha=lr)


class DiLoCo(OuterStep):
    """Outer Nesterov SGD on the all-reduced pseudo-gradient; every replica restarts from the new global model.

    Every round: ``Δ = θ_anchor − (1/W) Σ_i θ_i`` (one all-reduce of the local pseudo-gradients), then torch's
    Nesterov SGD on the anchor: ``b ← μ b + Δ``; ``d = Δ + μ b``; ``θ_anchor ← θ_anchor − lr·d``; ``θ_i ← θ_anchor``.
    The inner optimizer's state is kept across rounds (as in the paper).

    Paper: Douillard, Feng, Rusu, Chhaparia, Donchev, Kuncoro, Ranzato, Szlam, Shen. *DiLoCo: Distributed
    Low-Communication Training of Language Models.* arXiv:2311.08105 (2023), Algorithm 1; outer optimizer as in
    torchft's reimplementation.

    Deviations: none in the update. The anchor and momentum are float32 whatever the parameter dtype (the paper
    keeps the outer optimizer in full precision). A non-finite averaged pseudo-gradient drops the round: replicas
    return to the anchor, momentum untouched. With a ``compressor`` the pseudo-gradient is compressed before it is
    averaged (Streaming DiLoCo quantises it to 4 bits; any :mod:`lightning_convergence.compress` compressor works),
    optionally with error feedback (EF14: the part a rank's payload dropped is added to its next pseudo-gradient).

    Args:
        lr: outer learning rate (paper: 0.7), > 0. ``lr=1, momentum=0`` is plain periodic averaging. Tune in
            [0.3, 1.0]; lower it if the loss jumps after each sync.
        momentum: outer momentum μ in [0, 1) (paper: 0.9). 0 turns the outer step into scaled averaging.
        nesterov: Nesterov (paper, default ``True``) or heavy-ball momentum (the NoLoCo repo's DiLoCo baseline).
        compressor: a :class:`~lightning_convergence.compress.Compressor` for the pseudo-gradient, or ``None``
            (default: send it in float32). Summable compressors travel in one all-reduce, the others in one
            all-gather; link bytes are what the communicator counts. The residual is `feedback.ef14`'s.
        error_feedback: with a compressor, carry each rank's compression residual into its next round (EF14).
            Default ``True``; keep it on for biased compressors such as Top-K.

    State: ``anchor`` θ_anchor and ``momentum_buffer`` b (flat float32), ``residual`` (per rank, with a compressor
    and error feedback), ``version``.

    Raises:
        ValueError: if ``lr`` ≤ 0 or ``momentum`` is outside [0, 1).

    Example:
        >>> outer = DiLoCo(lr=0.7, momentum=0.9)
        >>> outer.lr, outer.momentum
        (0.7, 0.9)
    """

    name = "diloco"
    leaves_replicas_identical = True

    def __init__(
        self, lr: float = 0.7, momentum: float = 0.9, nesterov: bool = True, compressor: Compressor | None = None,
        error_feedback: bool = True,
    ) -> None:
        lr = check_number("DiLoCo", "lr", lr, 0, low_open=True)
        momentum = check_number("DiLoCo", "momentum", momentum, 0, 1, high_open=True)
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)
        self.compressor = compressor
        self.error_feedback = bool(error_feedback)
        self._residual: dict[str, Tensor] = {}  # EF14's e_i, keyed like feedback/ef14 ("diloco")
        self.anchor: Tensor | None = None
        self.momentum_buffer: Tensor | None = None

    def init_state(self, params: list[Tensor]) -> None:
        self.anchor = flatten(params)
        self.momentum_buffer = torch.zeros_like(self.anchor)
        self._residual = {}

    @property
    def residual(self) -> Tensor | None:
        """This rank's EF14 residual ``e_i`` (``None`` before the first compressed round or without feedback)."""
        return self._residual.get(self.name)

    def _average(self, delta: Tensor, comm: Communicator, step: int) -> Tensor:
        """Mean over ranks of ``delta``, compressed if asked (EF14 through ``feedback.ef14``)."""
        if self.compressor is None:
            comm.all_reduce_mean_(delta)
            return delta
        from lightning_convergence.comm import average_payloads

        if self.error_feedback:
            p = ef14_input(self._residual, self.name, delta)
            payload = self.compressor.compress(p, step, self.name)
            ef14_commit(self._residual, self.name, p, payload.decompress().reshape(delta.shape).to(delta.dtype))
        else:
            payload = self.compressor.compress(delta, step, self.name)
        (mean,) = average_payloads([payload], comm)
        return mean.to(delta.dtype)

    def sync(self, params: list[Tensor], comm: Communicator, step: int) -> SyncStats:
        anchor = self._require_state(self.anchor)
        buf = self._require_state(self.momentum_buffer)
        local = flatten(params)
        before = comm.link_bytes_total
        delta = self._average(anchor - local, comm, step)
        nbytes = comm.link_bytes_total - before
        divergence_sq = sqn(local - (anchor - delta))
        if not finite(delta):
            unflatten_into(anchor, params)
            return SyncStats(nbytes, torch.zeros(()), divergence_sq, skipped=True)
        pseudo_grad_sq = sqn(delta)
        nesterov_outer_update(anchor, buf, delta, self.lr, self.momentum, self.nesterov)
        unflatten_into(anchor, params)
        return SyncStats(nbytes, pseudo_grad_sq, divergence_sq)

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "anchor": None if self.anchor is None else self.anchor.clone(),
            "momentum_buffer": None if self.momentum_buffer is None else self.momentum_buffer.clone(),
            "residual": None if self.residual is None else self.residual.clone(),
            "compressor": None if self.compressor is None else self.compressor.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_version(state)
        self.anchor = None if state["anchor"] is None else state["anchor"].clone()
        self.momentum_buffer = None if state["momentum_buffer"] is None else state["momentum_buffer"].clone()
        self._residual = {} if state.get("residual") is None else {self.name: state["residual"].clone()}
        if self.compressor is not None and state.get("compressor") is not None:
            self.compressor.load_state_dict(state["compressor"])
