"""The one communication layer: collectives that count the link bytes each rank sends (with flat-buffer mean and
broadcast helpers), their link-byte formulas, payload averaging and the quantized reduce-scatter + all-gather mean
(any :class:`~lightning_convergence.compress.BlockQuantizer` codec). Imports torch only (never ``lightning``).
"""

from lightning_convergence.comm.communicator import (
    Communicator,
    PendingMean,
    SingleProcessCommunicator,
    TorchDistCommunicator,
    done,
)
from lightning_convergence.comm.links import (
    all_gather_link_bytes,
    all_reduce_link_bytes,
    all_to_all_link_bytes,
    broadcast_link_bytes,
    ddp_link_bytes,
    point_to_point_link_bytes,
    quantized_mean_link_bytes,
)
from lightning_convergence.comm.payloads import (
    average_payloads,
    average_payloads_async,
    first_round,
    link_bytes_per_rank,
    payload_bytes,
    payloads_from_bytes,
)
from lightning_convergence.comm.quantized import BLOCK, QuantizedMean, quantized_link_bytes, quantized_mean_async

__all__ = [
    "BLOCK",
    "Communicator",
    "PendingMean",
    "QuantizedMean",
    "SingleProcessCommunicator",
    "TorchDistCommunicator",
    "all_gather_link_bytes",
    "all_reduce_link_bytes",
    "all_to_all_link_bytes",
    "average_payloads",
    "average_payloads_async",
    "broadcast_link_bytes",
    "ddp_link_bytes",
    "done",
    "first_round",
    "link_bytes_per_rank",
    "payload_bytes",
    "payloads_from_bytes",
    "point_to_point_link_bytes",
    "quantized_link_bytes",
    "quantized_mean_link_bytes",
    "quantized_mean_async",
]
