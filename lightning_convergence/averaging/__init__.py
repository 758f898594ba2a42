"""Local-SGD cores: periodic averaging, the DiLoCo outer step, NoLoCo pairing, CO2 overlap, and schedules.

Torch only (never ``lightning``); communication goes through a :class:`Communicator` so tests can pass a fake.
"""

from lightning_convergence.averaging.base import (
    Communicator,
    OuterStep,
    SyncStats,
    TorchDistCommunicator,
    allreduce_bytes,
    flatten,
    unflatten_into,
)
from lightning_convergence.averaging.co2 import CO2
from lightning_convergence.averaging.diloco import DiLoCo, nesterov_outer_update
from lightning_convergence.averaging.noloco import NoLoCo, noloco_pairs, noloco_partner
from lightning_convergence.averaging.periodic import PeriodicAveraging
from lightning_convergence.averaging.schedules import FixedPeriod, IncreasingFrequency, SingleFinalMerge, SyncSchedule
from lightning_convergence.averaging.streaming import StreamingDiLoCo

__all__ = [
    "CO2",
    "Communicator",
    "DiLoCo",
    "FixedPeriod",
    "IncreasingFrequency",
    "NoLoCo",
    "OuterStep",
    "PeriodicAveraging",
    "SingleFinalMerge",
    "StreamingDiLoCo",
    "SyncSchedule",
    "SyncStats",
    "TorchDistCommunicator",
    "allreduce_bytes",
    "flatten",
    "nesterov_outer_update",
    "noloco_pairs",
    "noloco_partner",
    "unflatten_into",
]

#: Names accepted by ``LocalSGDStrategy(outer=...)``.
OUTER_STEPS: dict[str, type[OuterStep]] = {
    "average": PeriodicAveraging,
    "diloco": DiLoCo,
    "noloco": NoLoCo,
    "co2": CO2,
}
