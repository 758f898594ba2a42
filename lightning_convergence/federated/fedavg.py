"""Synchronous FedAvg (and FedProx's server, which is FedAvg): average the round's deltas, step the server model."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from lightning_convergence._checks import argument_error, check_int, check_numbers
from lightning_convergence.federated.base import ParamDict, ServerRule, weighted_sum

__all__ = ["FedAvg"]


def _check_clients(owner: str, num_clients: int, client_weights: Sequence[float] | None) -> list[float]:
    check_int(owner, "num_clients", num_clients, 1)
    if client_weights is None:
        return [1.0 / num_clients] * num_clients
    weights = check_numbers(owner, "client_weights", client_weights, num_clients, 0, low_open=True)
    total = sum(weights)
    return [w / total for w in weights]


class FedAvg(ServerRule):
    """Synchronous federated averaging: every round, ``w ← w + η_g · Σ_{i∈S} p_i Δ_i / Σ_{i∈S} p_i``.

    Paper:
        McMahan, Moore, Ramage, Hampson, Agüera y Arcas. *Communication-Efficient Learning of Deep Networks from
        Decentralized Data.* AISTATS 2017, arXiv:1602.05629 (Algorithm 1, FederatedAveraging).

    Deviations:
        The average is taken over the clients that reported in the round (``S``), re-normalised by their weights, so a
        round closed early by a timeout (:meth:`close_round`) is still an average. Deltas are summed in client-id order,
        so the result does not depend on arrival order.

    Args:
        num_clients: N, the number of clients (ids ``0..N-1``), ≥ 1.
        server_lr: η_g, > 0. Default ``1.0`` (the paper's plain average). Values > 1 extrapolate (FedOpt-style).
        client_weights: p_i, one positive number per client (e.g. shard sizes n_i); normalised. Default uniform.

    State:
        Base state plus the round's received deltas and the expected participants.

    Logs:
        Through the runner: ``convergence/fl/updates_applied_total``, ``convergence/fl/staleness_steps`` (always 0).

    Raises:
        ValueError: for ``num_clients`` < 1, bad ``client_weights``, or :meth:`begin_round` with unknown ids.

    Example:
        >>> import torch
        >>> rule = FedAvg(num_clients=2)
        >>> rule.init_params({"w": torch.zeros(1)})
        >>> rule.receive(0, {"w": torch.ones(1)}, base_version=0) and rule.receive(1, {"w": 3 * torch.ones(1)}, 0)
        True
        >>> rule.params["w"].item(), rule.version
        (2.0, 1)
    """

    name = "fedavg"
    synchronous = True
    round_based = True

    def __init__(
        self, num_clients: int, server_lr: float = 1.0, client_weights: Sequence[float] | None = None
    ) -> None:
        super().__init__(server_lr=server_lr)
        self.num_clients = num_clients
        self.weights = _check_clients(type(self).__name__, num_clients, client_weights)
        self.expected: set[int] = set(range(num_clients))
        self.buffer: dict[int, ParamDict] = {}
        self.rounds_total = 0

    def begin_round(self, participants: Iterable[int]) -> None:
        ids = {int(i) for i in participants}
        if any(not 0 <= i < self.num_clients for i in ids):
            raise argument_error(type(self).__name__, "participants", f"ids in [0, {self.num_clients})", sorted(ids))
        self.expected = ids

    def _admissible(self, client_id: int, staleness: int) -> bool:
        return staleness == 0 and client_id in self.expected and client_id not in self.buffer

    def _accept(self, client_id: int, delta: ParamDict, staleness: int, now: float) -> None:
        self.buffer[client_id] = delta
        if set(self.buffer) >= self.expected:
            self._aggregate()

    def close_round(self, now: float = 0.0) -> bool:
        self.advance(now)
        changed = bool(self.buffer)
        self._aggregate()
        return changed

    def _aggregate(self) -> None:
        """End the round: apply the buffered deltas (if any) with :meth:`_round_weights` and open the next one."""
        self.rounds_total += 1
        if self.buffer:
            step = weighted_sum(self.buffer, self._round_weights())
            self._add_to_params(step, self.server_lr)
            self._bump(len(self.buffer))
        self.buffer.clear()
        self.expected = set(range(self.num_clients))

    def _round_weights(self) -> dict[int, float]:
        """FedAvg's weights: the participants' ``p_i``, renormalised over the participants."""
        total = sum(self.weights[i] for i in self.buffer)
        return {i: self.weights[i] / total for i in self.buffer}

    def _extra_state(self) -> dict:
        return {"buffer": {i: {k: v.clone() for k, v in d.items()} for i, d in self.buffer.items()},
                "expected": sorted(self.expected), "rounds_total": self.rounds_total}

    def _load_extra_state(self, state: Mapping) -> None:
        self.buffer = {int(i): dict(d) for i, d in state["buffer"].items()}
        self.expected = {int(i) for i in state["expected"]}
        self.rounds_total = int(state["rounds_total"])
