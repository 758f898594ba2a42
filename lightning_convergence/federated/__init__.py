"""Federated server rules (torch only): FedAvg, FedProx, FedAsync, FedBuff, FedFix, FedAU; partitioning; simulation."""

from lightning_convergence.federated.base import STALENESS_FUNCTIONS, ParamDict, ServerRule, staleness_weight
from lightning_convergence.federated.fedasync import FedAsync
from lightning_convergence.federated.fedau import FedAU
from lightning_convergence.federated.fedavg import FedAvg
from lightning_convergence.federated.fedbuff import FedBuff
from lightning_convergence.federated.fedfix import FedFix
from lightning_convergence.federated.fedprox import FedProx, add_proximal_grad, proximal_term

__all__ = [
    "STALENESS_FUNCTIONS", "FedAU", "FedAsync", "FedAvg", "FedBuff", "FedFix", "FedProx", "ParamDict", "ServerRule",
    "add_proximal_grad", "proximal_term", "staleness_weight",
]
