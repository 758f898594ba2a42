"""Local-SGD cores: periodic averaging, the DiLoCo outer step, NoLoCo pairing, CO2 overlap, and schedules.

Torch only (never ``lightning``); communication goes through a :class:`Communicator` so tests can pass a fake.
"""

import importlib

from lightning_convergence._checks import argument_error
from lightning_convergence.averaging.base import (
    Communicator,
    OuterStep,
    SyncStats,
    TorchDistCommunicator,
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
    "flatten",
    "make_outer_step",
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


def make_outer_step(outer: str | OuterStep) -> OuterStep:
    """An :class:`OuterStep` from a name in :data:`OUTER_STEPS`, a dotted path to a subclass, or an instance.

    Raises:
        ValueError: an unknown name or a path that is not an ``OuterStep`` subclass.
        TypeError: neither a str nor an ``OuterStep``.
    """
    if isinstance(outer, OuterStep):
        return outer
    if isinstance(outer, str):
        if outer in OUTER_STEPS:
            return OUTER_STEPS[outer]()
        if "." in outer:
            module, _, name = outer.rpartition(".")
            cls = getattr(importlib.import_module(module), name)
            if isinstance(cls, type) and issubclass(cls, OuterStep):
                return cls()
        raise argument_error("LocalSGDStrategy", "outer", f"one of {', '.join(repr(k) for k in sorted(OUTER_STEPS))}, "
                             "a dotted path to an OuterStep subclass, or an OuterStep instance", outer)
    raise argument_error("LocalSGDStrategy", "outer", "a str or an OuterStep", outer, TypeError)
