"""What DeMo and 1-bit Adam share as optimizers that own their communication (imports torch only).

The communicator they call (:attr:`CommOptimizer.comm`, a :class:`~lightning_convergence.comm.Communicator` that
counts the link bytes this rank sends), sync-free masking of steps dropped for non-finite
gradients (:func:`where_ok`), their count, and ``state_dict`` entries beyond torch's (``state_dict()[key]`` with a
``version``), which hold this rank's own buffers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_convergence._checks import check_state_version
from lightning_convergence.comm import Communicator, SingleProcessCommunicator

__all__ = ["CommOptimizer", "where_ok"]

STATE_VERSION = 1


def where_ok(ok: Tensor, value: float, otherwise: float, like: Tensor) -> Tensor:
    """A 0-dim tensor in ``like``'s dtype and device: ``value`` if ``ok`` else ``otherwise``, read on device.

    Used as a multiplier so that a step dropped for non-finite gradients changes nothing, without a host sync.
    Both constants are built in ``like``'s dtype, so float64 runs are not rounded through float32.
    """
    a = torch.full((), value, dtype=like.dtype, device=like.device)
    return torch.where(ok, a, torch.full((), otherwise, dtype=like.dtype, device=like.device))


class CommOptimizer(Optimizer):
    """Base of optimizers that communicate themselves; subclasses set :attr:`extra_key` and :attr:`extra_tensors`.

    State: ``state_dict()[extra_key]`` holds ``version`` and the attributes named in :attr:`extra_tensors`
    (tensors or ``None``) next to torch's ``state`` and ``param_groups``.
    """

    extra_key = "comm"
    extra_tensors: tuple[str, ...] = ("nonfinite_skipped_total",)

    def __init__(self, params: Any, defaults: dict[str, Any]) -> None:
        super().__init__(params, defaults)
        self.comm: Communicator = SingleProcessCommunicator()
        self.nonfinite_skipped_total: Tensor | None = None

    def attach(self, comm: Communicator) -> None:
        """Use ``comm`` for this optimizer's collectives (the strategy hands ``TorchDistCommunicator()`` once the
        process group exists; tests pass a ``SingleProcessCommunicator`` or a fake subclass)."""
        self.comm = comm

    def owns_communication(self) -> bool:  # pragma: no cover - abstract
        """True when the coming step communicates itself, so DDP's gradient all-reduce must not run."""
        raise NotImplementedError

    def comm_params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def dense_bytes(self) -> int:
        """Bytes of the gradients one DDP all-reduce would carry (the baseline's per-rank input)."""
        return sum(p.numel() * p.element_size() for p in self.comm_params())

    @staticmethod
    def run_closure(closure: Callable[[], float] | None) -> float | None:
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def count_skip(self, ok: Tensor) -> None:
        """Add one to ``nonfinite_skipped_total`` (on device) when ``ok`` is False."""
        skipped = (~ok).to(torch.float32)
        prev = self.nonfinite_skipped_total
        self.nonfinite_skipped_total = skipped if prev is None else prev.to(skipped.device) + skipped

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        extra: dict[str, Any] = {"version": STATE_VERSION}
        for name in self.extra_tensors:
            value = getattr(self, name)
            extra[name] = None if value is None else value.detach().cpu().clone()
        out[self.extra_key] = extra
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop(self.extra_key, None)
        if extra is not None:
            check_state_version(type(self).__name__, extra, STATE_VERSION)
        super().load_state_dict(state_dict)
        if extra is not None:
            device = self.comm_params()[0].device
            for name in self.extra_tensors:
                value = extra.get(name)
                setattr(self, name, None if value is None else value.to(device).clone())
