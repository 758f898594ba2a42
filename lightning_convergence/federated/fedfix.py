"""FedFix: asynchronous clients, aggregation at fixed time windows with weights d_i = ⌈τ_i/Δt⌉·p_i."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from lightning_convergence._checks import check_number
from lightning_convergence.federated.base import ParamDict, ServerRule, weighted_sum
from lightning_convergence.federated.fedavg import _check_clients

__all__ = ["FedFix"]


class FedFix(ServerRule):
    """Fixed-period aggregation: at time ``(n+1)·Δt``, ``θ ← θ + η_g Σ_{i∈S_n} d_i·Δ_i`` with ``d_i = ⌈τ_i/Δt⌉·p_i``.

    Paper:
        Fraboni, Vidal, Kameni, Lorenzi. *A General Theory for Federated Optimization with Asynchronous and
        Heterogeneous Clients Updates.* JMLR 2023, arXiv:2206.10189 (FedFix; weights checked against the authors'
        code, the "FedFix-weight" scheme, the only FedFix weighting it implements).

    Deviations:
        ⌈τ_i/Δt⌉ is measured, not given: a client restarts at a window boundary (it waits for the next aggregation,
        ``synchronous = True``), so the windows it spanned are ``version − base_version + 1`` at arrival; this equals
        ⌈τ_i/Δt⌉ for the paper's schedule. The version counts windows (it advances on empty windows too).

    Args:
        period: Δt, the aggregation period in the runner's time unit (virtual time in simulation, seconds in real
            mode), > 0. The paper's FedFix-X uses Δt = X. Take roughly the fast clients' compute time: shorter wastes
            updates of slow clients in windows, longer makes fast clients idle.
        num_clients: M, ≥ 1.
        server_lr: η_g, > 0. Default ``1.0`` (paper).
        client_weights: p_i (uniform 1/M, or data ratios n_i/N), normalised. Default uniform.

    State:
        Base state (``version`` = windows elapsed, ``clock``) plus the current window's deltas and weights.

    Logs:
        Through the runner: ``convergence/fl/staleness_steps`` (windows − 1), ``convergence/fl/updates_applied_total``.

    Raises:
        ValueError: for a non-positive ``period`` and as :class:`FedAvg` for the client arguments.

    Example:
        >>> import torch
        >>> rule = FedFix(period=1.0, num_clients=2)
        >>> rule.init_params({"w": torch.zeros(1)})
        >>> _ = rule.receive(0, {"w": torch.ones(1)}, base_version=0, now=0.5)
        >>> rule.advance(1.0), rule.params["w"].item()
        (1, 0.5)
    """

    name = "fedfix"
    synchronous = True

    def __init__(
        self, period: float, num_clients: int, server_lr: float = 1.0, client_weights: Sequence[float] | None = None
    ) -> None:
        super().__init__(server_lr=server_lr)
        check_number("FedFix", "period", period, 0, low_open=True)
        self.period = float(period)
        self.num_clients = num_clients
        self.weights = _check_clients("FedFix", num_clients, client_weights)
        self.buffer: dict[int, ParamDict] = {}
        self.buffer_weights: dict[int, float] = {}

    def next_boundary(self) -> float:
        """The time of the next aggregation, ``(version + 1)·Δt``."""
        return (self.version + 1) * self.period

    def _accept(self, client_id: int, delta: ParamDict, staleness: int, now: float) -> None:
        if client_id in self.buffer:  # cannot happen when clients restart only at boundaries; keep exactly-once
            self._add_into(client_id, delta, staleness)
            return
        self.buffer[client_id] = delta
        self.buffer_weights[client_id] = (staleness + 1) * self.weights[client_id]

    def _add_into(self, client_id: int, delta: ParamDict, staleness: int) -> None:
        d = (staleness + 1) * self.weights[client_id]
        old_w = self.buffer_weights[client_id]
        self.buffer[client_id] = {k: v * old_w + delta[k] * d for k, v in self.buffer[client_id].items()}
        self.buffer_weights[client_id] = 1.0

    def advance(self, now: float, inclusive: bool = True) -> int:
        n = 0
        while self.next_boundary() < now or (inclusive and self.next_boundary() <= now):
            if self.buffer:
                self._add_to_params(weighted_sum(self.buffer, self.buffer_weights), self.server_lr)
            self._bump(len(self.buffer))
            self.buffer.clear()
            self.buffer_weights.clear()
            n += 1
        super().advance(now)
        return n

    def _extra_state(self) -> dict:
        return {"buffer": {i: {k: v.clone() for k, v in d.items()} for i, d in self.buffer.items()},
                "buffer_weights": dict(self.buffer_weights)}

    def _load_extra_state(self, state: Mapping) -> None:
        self.buffer = {int(i): dict(d) for i, d in state["buffer"].items()}
        self.buffer_weights = {int(i): float(w) for i, w in state["buffer_weights"].items()}
