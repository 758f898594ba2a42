"""Federated server rules (torch only): FedAvg, FedProx, FedAsync, FedBuff, FedFix, FedAU; partitioning; simulation."""

from lightning_convergence.federated.base import STALENESS_FUNCTIONS, ParamDict, ServerRule, staleness_weight
from lightning_convergence.federated.client import ClientStream, load_params, local_train, module_params
from lightning_convergence.federated.fedasync import FedAsync
from lightning_convergence.federated.fedau import FedAU
from lightning_convergence.federated.fedavg import FedAvg
from lightning_convergence.federated.fedbuff import FedBuff
from lightning_convergence.federated.fedfix import FedFix
from lightning_convergence.federated.fedprox import FedProx, add_proximal_grad, proximal_term
from lightning_convergence.federated.partition import PARTITIONS, Participation, partition_indices, speed_factors
from lightning_convergence.federated.simulation import FederatedSimulation

__all__ = [
    "PARTITIONS", "STALENESS_FUNCTIONS", "ClientStream", "FedAU", "FedAsync", "FedAvg", "FedBuff", "FedFix", "FedProx",
    "FederatedSimulation", "ParamDict", "Participation", "ServerRule", "add_proximal_grad", "load_params",
    "local_train", "module_params", "partition_indices", "proximal_term", "speed_factors", "staleness_weight",
]
