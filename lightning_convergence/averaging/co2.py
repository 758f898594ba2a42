"""CO2-style overlapped outer step: round r's average travels while round r+1 computes, and lands one round late.

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
    PendingMean,
    SyncStats,
    finite,
    flatten,
    sqn,
    unflatten_into,
)

__all__ = ["CO2"]


class CO2(OuterStep):
    """Outer momentum on a one-round-stale averaged pseudo-gradient, with the all-reduce fully overlapped.

    At the end of round r every replica i has trained from ``s_i`` (its round start) to ``θ_i``; its round
    pseudo-gradient ``δ_i = s_i − θ_i`` is handed to an ``async_op`` all-reduce (a copy) and training continues at
    once. At the end of round r+1 the mean ``Δ̄_r`` is waited for (it has had a whole round to travel) and applied:
    ``m ← β m + Δ̄_r / λ``; optionally ``m ← clamp(m, −c, c)`` element-wise; ``x ← x − lr·m`` (x: the global model);
    then ``θ_i ← x − δ_i^{(r+1)}``: each replica keeps its own latest, not yet averaged, round of progress on top of
    the updated global model, and that round's δ goes into the next all-reduce. :meth:`finalize` drains the pipe
    (applies the pending mean, then averages the last round synchronously) so every replica ends on ``x``.

    Paper: Sun, Qin, Sun, Li, Li, Shen, Qiao, Zhong. *CO2: Efficient Distributed Training with Full
    Communication-Computation Overlap.* ICLR 2024, arXiv:2401.16265. Outer update as in the released code
    (``weigao266/fairscale-CO2``, ``_perform_local_optimization``): ``m ← β m + (θ_old − θ̄)/λ``, clip, ``θ_old ←
    θ_old − lr·m``.

    Deviations (checked against the released ``co2.py``): (1) its clip is a no-op (``torch.clamp`` result
    discarded); here ``clamp_`` clips as intended. (2) λ is a constant, as there; the paper's adaptive staleness-gap
    penalty was not retrieved. (3) The overlap is ours. The released code takes the outer step on a *synchronous*
    reduce/broadcast of the current parameters (blocking, in the training thread) and overlaps only the LocalSGD
    parameter all-reduce, run every ``localsgd_frequency`` steps in a background thread on the live parameters; here
    the outer pseudo-gradient itself travels during the next round and is applied one round late, each replica
    keeping its own last round of progress (the paper's "one-step asynchronous" outer update as we read it). With
    H equal to the released ``outer_frequency`` there is no separate inner LocalSGD averaging. (4) A non-finite
    arrived mean is dropped (momentum untouched).

    Args:
        lr: outer learning rate (released code default 1.0), > 0.
        momentum: β, outer momentum in [0, 1). Default 0.2 (the released example script; fairseq picks 0.0 for ≤ 16
            GPUs, 0.5 for ≤ 64). Raise with more workers.
        gap_penalty: λ, staleness gap penalty > 0 dividing the stale pseudo-gradient. Default 1.0 (no penalty);
            values > 1 damp stale updates.
        clip: clip the outer momentum element-wise. Default ``True`` (the released example script passes
            ``--co2-clip``).
        clip_threshold: c > 0, the element-wise bound. Default 1.0.

    State: ``anchor`` x, ``momentum_buffer`` m, ``round_start`` s_i (per rank), ``pending`` (the arrived or in-flight
    mean, materialised on save), ``version``. ``round_start`` differs across ranks.

    Raises:
        ValueError: if ``lr`` ≤ 0, ``momentum`` ∉ [0, 1), ``gap_penalty`` ≤ 0 or ``clip_threshold`` ≤ 0.

    Example:
        >>> CO2(lr=1.0, momentum=0.2, gap_penalty=1.0, clip=True, clip_threshold=1.0).clip
        True
    """

    name = "co2"

    def __init__(
        self, lr: float = 1.0, momentum: float = 0.2, gap_penalty: float = 1.0, clip: bool = True,
        clip_threshold: float = 1.0,
    ) -> None:
        lr = check_number("CO2", "lr", lr, 0, low_open=True)
        momentum = check_number("CO2", "momentum", momentum, 0, 1, high_open=True)
        gap_penalty = check_number("CO2", "gap_penalty", gap_penalty, 0, low_open=True)
        clip_threshold = check_number("CO2", "clip_threshold", clip_threshold, 0, low_open=True)
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.gap_penalty = float(gap_penalty)
        self.clip = bool(clip)
        self.clip_threshold = float(clip_threshold)
        self.anchor: Tensor | None = None
        self.momentum_buffer: Tensor | None = None
        self.round_start: Tensor | None = None
        self._pending: PendingMean | None = None
        self._pending_local: Tensor | None = None  # this rank's δ of the round in flight (for the divergence)

    def init_state(self, params: list[Tensor]) -> None:
        self.anchor = flatten(params)
        self.momentum_buffer = torch.zeros_like(self.anchor)
        self.round_start = self.anchor.clone()
        self._pending = None
        self._pending_local = None

    def _apply_pending(self) -> tuple[Tensor, Tensor, bool]:
        """Wait for the mean in flight and take the outer step with it; returns (‖Δ̄‖², divergence², skipped)."""
        anchor, buf = self._require_state(self.anchor), self._require_state(self.momentum_buffer)
        if self._pending is None:
            return torch.zeros(()), torch.zeros(()), False
        mean = self._pending.wait()
        local = self._pending_local if self._pending_local is not None else mean
        self._pending, self._pending_local = None, None
        divergence_sq = sqn(local - mean)
        if not finite(mean):
            return torch.zeros(()), divergence_sq, True
        buf.mul_(self.momentum).add_(mean, alpha=1.0 / self.gap_penalty)
        if self.clip:
            buf.clamp_(-self.clip_threshold, self.clip_threshold)  # the intended clip (released code: a no-op)
        anchor.sub_(buf, alpha=self.lr)
        return sqn(mean), divergence_sq, False

    def sync(self, params: list[Tensor], comm: Communicator, step: int) -> SyncStats:
        start = self._require_state(self.round_start)
        local = flatten(params)
        delta = start - local  # this round's own progress
        pseudo_grad_sq, divergence_sq, skipped = self._apply_pending()
        anchor = self._require_state(self.anchor)
        new_local = anchor - delta
        unflatten_into(new_local, params)
        start.copy_(new_local)
        self._pending_local = delta.clone()
        before = comm.link_bytes_total
        self._pending = comm.all_reduce_mean_async(delta)  # delta is owned by the collective from here on
        return SyncStats(comm.link_bytes_total - before, pseudo_grad_sq, divergence_sq, skipped=skipped)

    def finalize(self, params: list[Tensor], comm: Communicator) -> SyncStats | None:
        """Apply the mean in flight, then average the current round synchronously: replicas end on ``x``."""
        start = self._require_state(self.round_start)
        delta = start - flatten(params)
        pseudo_grad_sq, divergence_sq, skipped = self._apply_pending()
        self._pending_local = delta.clone()
        before = comm.link_bytes_total
        comm.all_reduce_mean_(delta)
        nbytes = comm.link_bytes_total - before
        self._pending = _Ready(delta)
        sq, div, skipped_last = self._apply_pending()
        anchor = self._require_state(self.anchor)
        unflatten_into(anchor, params)
        start.copy_(anchor)
        return SyncStats(nbytes, sq, div, skipped=skipped or skipped_last)

    def state_dict(self) -> dict[str, Any]:
        pending = None if self._pending is None else self._pending.wait().clone()
        if pending is not None:
            self._pending = _Ready(pending.clone())  # the wait above completed it; keep using the same values
        return {
            "version": STATE_VERSION,
            "anchor": None if self.anchor is None else self.anchor.clone(),
            "momentum_buffer": None if self.momentum_buffer is None else self.momentum_buffer.clone(),
            "round_start": None if self.round_start is None else self.round_start.clone(),
            "pending": pending,
            "pending_local": None if self._pending_local is None else self._pending_local.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_version(state)
        for key in ("anchor", "momentum_buffer", "round_start"):
            setattr(self, key, None if state[key] is None else state[key].clone())
        self._pending = None if state["pending"] is None else _Ready(state["pending"].clone())
        self._pending_local = None if state["pending_local"] is None else state["pending_local"].clone()


class _Ready:
    """A mean that has already arrived (restored from a checkpoint, or materialised by ``state_dict``)."""

    def __init__(self, tensor: Tensor) -> None:
        self._tensor = tensor

    def wait(self) -> Tensor:
        return self._tensor
