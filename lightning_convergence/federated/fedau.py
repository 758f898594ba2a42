"""FedAU: weight each participating client by its online-estimated mean participation interval ω_n (≈ 1/p_n)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from lightning_convergence._checks import check_int
from lightning_convergence.federated.fedavg import FedAvg

__all__ = ["FedAU"]


class FedAU(FedAvg):
    """Round-based FedAvg with participation-interval weights: ``x ← x + η_g·(1/N)·Σ_{n∈S} ω_n·Δ_n``.

    Paper:
        Wang, Ji. *A Lightweight Method for Tackling Unknown Participation Statistics in Federated Averaging.*
        ICLR 2024, arXiv:2306.03401 (Algorithm 1 with its online weight estimation).

    Deviations:
        None intended; the timing follows the authors' code (IBM/fedau ``main.py``, ``weighting_method='adaptive'``).
        A round's update weighs each participant by ω_n from the intervals closed *before* this round (ω_n = 1
        while none is closed); then every client's open interval grows by one and closes when the client
        participated or reached the cutoff K, and ω_n becomes the running mean of the closed intervals
        (ω_n → 1/p_n under Bernoulli(p_n) participation). A round ends when all expected participants reported or
        at :meth:`close_round`; a participant whose update was lost counts as absent in that round.

    Args:
        num_clients: N, ≥ 1 (ids ``0..N-1``); the update divides by N, non-participants contribute 0.
        cutoff_rounds: K, the longest interval counted, ≥ 1. Default ``50`` (bounds ω_n ≤ K for clients that
            rarely or never participate; larger K is less biased but noisier).
        server_lr: η_g, > 0. Default ``1.0``.

    State:
        Base state plus ω_n, the number of closed intervals M_n and the open interval length S_n per client, the
        round's deltas and expected participants, and ``rounds_total``.

    Logs:
        Through the runner: ``convergence/fl/updates_applied_total``; ``convergence/fl/weight/client<n>`` with
        ``log_per_item``.

    Raises:
        ValueError: for ``num_clients`` or ``cutoff_rounds`` < 1, or unknown ids in :meth:`begin_round`.

    Example:
        >>> import torch
        >>> rule = FedAU(num_clients=2)
        >>> rule.init_params({"w": torch.zeros(1)})
        >>> rule.begin_round([0]); _ = rule.receive(0, {"w": torch.ones(1)}, 0)
        >>> rule.params["w"].item()   # (1/N)·ω_0·Δ_0 with ω_0 = 1 (no interval closed yet)
        0.5
    """

    name = "fedau"
    synchronous = True
    round_based = True

    def __init__(self, num_clients: int, cutoff_rounds: int = 50, server_lr: float = 1.0) -> None:
        super().__init__(num_clients, server_lr=server_lr)  # FedAvg's round machinery; weights replaced below
        check_int("FedAU", "cutoff_rounds", cutoff_rounds, 1)
        self.cutoff_rounds = cutoff_rounds
        self.omega = [1.0] * num_clients
        self.intervals = [0] * num_clients
        self.open_interval = [0] * num_clients

    def update_weights(self, participated: Iterable[int]) -> None:
        """FedAU's online estimate, one round: grow every open interval; close it on participation or at K."""
        part = set(participated)
        for n in range(self.num_clients):
            self.open_interval[n] += 1
            if n in part or self.open_interval[n] >= self.cutoff_rounds:
                m, s = self.intervals[n], self.open_interval[n]
                self.omega[n] = float(s) if m == 0 else (m * self.omega[n] + s) / (m + 1)
                self.intervals[n] = m + 1
                self.open_interval[n] = 0

    def _aggregate(self) -> None:
        # The step uses ω from intervals closed before this round (the authors' timing); then every round, empty or
        # not, advances the participation intervals with this round's participants.
        participated = set(self.buffer)
        super()._aggregate()
        self.update_weights(participated)

    def _round_weights(self) -> dict[int, float]:
        """``ω_n / N`` (not renormalised over the participants: non-participants contribute 0)."""
        return {n: self.omega[n] / self.num_clients for n in self.buffer}

    def metrics(self, log_per_item: bool = False) -> dict[str, float]:
        out = super().metrics(log_per_item)
        if log_per_item:
            out.update({f"weight/client{n}": w for n, w in enumerate(self.omega)})
        return out

    def _extra_state(self) -> dict:
        return {**super()._extra_state(), "omega": list(self.omega), "intervals": list(self.intervals),
                "open_interval": list(self.open_interval)}

    def _load_extra_state(self, state: Mapping) -> None:
        super()._load_extra_state(state)
        self.omega = [float(w) for w in state["omega"]]
        self.intervals = [int(m) for m in state["intervals"]]
        self.open_interval = [int(s) for s in state["open_interval"]]
