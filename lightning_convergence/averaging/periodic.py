"""Plain parameter averaging every H steps (local SGD / post-local SGD's model averaging).

Paper: Lin, Stich, Patel, Jaggi. *Don't Use Large Mini-Batches, Use Local SGD.* ICLR 2020, arXiv:1808.07217
(post-local SGD); Stich. *Local SGD Converges Fast and Communicates Little.* ICLR 2019, arXiv:1805.09767.
Imports torch only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

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

__all__ = ["PeriodicAveraging"]


class PeriodicAveraging(OuterStep):
    """Replace every replica by the mean of all replicas: ``θ_i ← (1/W) Σ_j θ_j`` (one all-reduce).

    Paper: Stich, *Local SGD Converges Fast and Communicates Little*, ICLR 2019, arXiv:1805.09767; with a DDP
    warm-up this is post-local SGD (Lin et al., ICLR 2020, arXiv:1808.07217), Lightning's ``model_averaging_period``.

    Deviations: keeps a float32 copy of the last synchronised model (the anchor) to report the pseudo-gradient norm
    ``||θ_anchor − θ̄||`` and to fall back to when the mean is not finite (the round is then dropped and counted).

    State: ``anchor`` (flat float32), ``version``.

    Example:
        >>> outer = PeriodicAveraging()  # doctest: +SKIP
        >>> outer.init_state(params); stats = outer.sync(params, TorchDistCommunicator(), step)  # doctest: +SKIP
    """

    name = "average"
    leaves_replicas_identical = True

    def __init__(self) -> None:
        self.anchor: Tensor | None = None

    def init_state(self, params: list[Tensor]) -> None:
        self.anchor = flatten(params)

    def sync(self, params: list[Tensor], comm: Communicator, step: int) -> SyncStats:
        anchor = self._require_state(self.anchor)
        local = flatten(params)
        mean = local.clone()
        before = comm.link_bytes_total
        comm.all_reduce_mean_(mean)
        nbytes = comm.link_bytes_total - before
        divergence_sq = sqn(local - mean)
        if not finite(mean):
            unflatten_into(anchor, params)  # drop the round: every rank returns to the last good model
            return SyncStats(nbytes, torch.zeros(()), divergence_sq, skipped=True)
        pseudo_grad_sq = sqn(anchor - mean)
        anchor.copy_(mean)
        unflatten_into(mean, params)
        return SyncStats(nbytes, pseudo_grad_sq, divergence_sq)

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "anchor": None if self.anchor is None else self.anchor.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_version(state)
        self.anchor = None if state["anchor"] is None else state["anchor"].clone()
