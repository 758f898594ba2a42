"""Per-rank state in checkpoints: gather every rank's slice into rank 0's file, give each rank its slice back.

Lightning's ``Strategy.save_checkpoint`` writes on global rank 0 only, so state that differs between ranks (error-
feedback residuals, local-SGD replicas, per-rank generators) would silently be lost. Strategies mix
:class:`PerRankStateMixin` in front of their Lightning base class and implement two methods; the checkpoint then
holds ``{key: {"version", "world_size", "ranks": [state_0, ..., state_{W-1}]}}``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from lightning_convergence._checks import check_state_version
from lightning_convergence.comm.communicator import TorchDistCommunicator

__all__ = ["PerRankStateMixin", "gather_rank_states", "pick_rank_state", "to_cpu"]

RANK_STATE_VERSION = 1


def to_cpu(obj: Any) -> Any:
    """Recursively move tensors to CPU (``all_gather_object`` pickles; NCCL would need device tensors)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def gather_rank_states(state: dict[str, Any], group: Any = None) -> list[dict[str, Any]]:
    """Every rank's ``state``, ordered by rank, on every rank (a collective: all ranks must call it)."""
    state = to_cpu(state)
    if not (dist.is_available() and dist.is_initialized()):
        return [state]
    return TorchDistCommunicator(group).all_gather_object(state)


def pick_rank_state(entry: dict[str, Any], rank: int, world_size: int, owner: str) -> dict[str, Any]:
    """This rank's slice of a gathered entry, after checking version and world size.

    Raises:
        RuntimeError: if the entry's version is unknown or it was written by a different world size (the per-rank
            state cannot be re-split; resume with the same number of processes).
    """
    check_state_version(owner, entry, RANK_STATE_VERSION)
    if int(entry["world_size"]) != world_size:
        raise RuntimeError(
            f"{owner}: the checkpoint holds per-rank state for `world_size`={entry['world_size']}, but this run has "
            f"{world_size} processes; resume with the same number of processes."
        )
    return entry["ranks"][rank]


class PerRankStateMixin:
    """Adds per-rank state to Lightning checkpoints. Put it *before* the strategy base class.

    Subclasses set :attr:`rank_state_key` (``"convergence/<part>"``) and implement :meth:`rank_state_dict` and
    :meth:`load_rank_state_dict`. On load, the slice for this rank is kept in :attr:`pending_rank_state` until the
    subclass calls :meth:`apply_pending_rank_state` at a point where its state objects exist (for example after
    ``setup``); Lightning restores checkpoints before the model is wrapped.
    """

    rank_state_key: str = "convergence/strategy"
    pending_rank_state: dict[str, Any] | None = None

    def rank_state_dict(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def load_rank_state_dict(self, state: dict[str, Any]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        # Called on every rank by Trainer.save_checkpoint, so the gather below is a valid collective.
        checkpoint[self.rank_state_key] = {
            "version": RANK_STATE_VERSION,
            "world_size": self.world_size,  # type: ignore[attr-defined]
            "ranks": gather_rank_states(self.rank_state_dict()),
        }
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)  # type: ignore[misc]

    def load_checkpoint(self, checkpoint_path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, *args, **kwargs)  # type: ignore[misc]
        entry = checkpoint.get(self.rank_state_key)
        if entry is not None:
            self.pending_rank_state = pick_rank_state(
                entry, self.global_rank, self.world_size, type(self).__name__  # type: ignore[attr-defined]
            )
        return checkpoint

    def apply_pending_rank_state(self) -> None:
        """Load the slice kept by :meth:`load_checkpoint`, once."""
        if self.pending_rank_state is not None:
            state, self.pending_rank_state = self.pending_rank_state, None
            self.load_rank_state_dict(state)
