"""FedProx: FedAvg's server with a proximal term (μ/2)·‖w − w_global‖² added to every client's local objective."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from lightning_convergence._checks import check_number
from lightning_convergence.federated.fedavg import FedAvg
from lightning_convergence.stats import sq_norm

__all__ = ["FedProx", "proximal_term", "add_proximal_grad"]


def proximal_term(named_params: Iterable[tuple[str, Tensor]], global_params: Mapping[str, Tensor], mu: float) -> Tensor:
    """(μ/2)·‖w − w_global‖², differentiable in ``w`` (add it to the local loss)."""
    diffs = [p - global_params[n].to(p.device, p.dtype) for n, p in named_params]
    return 0.5 * mu * sq_norm(diffs)


@torch.no_grad()
def add_proximal_grad(
    named_params: Iterable[tuple[str, Tensor]], global_params: Mapping[str, Tensor], mu: float
) -> None:
    """Add the proximal term's gradient μ·(w − w_global) to each parameter's ``.grad`` in place (after backward)."""
    if mu == 0:
        return
    for n, p in named_params:
        if p.grad is None:
            continue
        p.grad.add_(p - global_params[n].to(p.device, p.dtype), alpha=mu)


class FedProx(FedAvg):
    """FedAvg on the server; clients minimise ``f_i(w) + (μ/2)‖w − w_global‖²`` for their K local steps.

    Paper:
        Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith. *Federated Optimization in Heterogeneous Networks.* MLSys 2020,
        arXiv:1812.06127 (Algorithm 2; the proximal term of Eq. 2).

    Deviations:
        Clients run a fixed number of local steps (no γ-inexactness criterion); the proximal gradient is added to the
        parameters' gradients after the user's backward, so the user's ``training_step`` stays unchanged.

    Args:
        num_clients: N, ≥ 1.
        mu: μ, the proximal coefficient, ≥ 0. Default ``0.01``; the paper tries {0.001, 0.01, 0.1, 1}. 0 is FedAvg.
            Raise it when client drift (non-IID data, many local steps) makes FedAvg oscillate.
        server_lr: η_g, > 0. Default ``1.0``.
        client_weights: p_i, normalised. Default uniform.

    State:
        As :class:`FedAvg` (μ is a hyperparameter, not state).

    Logs:
        As :class:`FedAvg`.

    Raises:
        ValueError: for a negative or non-finite ``mu`` and as :class:`FedAvg`.

    Example:
        >>> rule = FedProx(num_clients=4, mu=0.01)
        >>> rule.prox_mu
        0.01
    """

    name = "fedprox"

    def __init__(
        self, num_clients: int, mu: float = 0.01, server_lr: float = 1.0,
        client_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__(num_clients=num_clients, server_lr=server_lr, client_weights=client_weights)
        check_number("FedProx", "mu", mu, 0)
        self.prox_mu = float(mu)
