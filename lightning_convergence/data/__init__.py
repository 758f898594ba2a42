"""Data-side plumbing the callbacks share: owning the train DataLoader's sampling."""

from lightning_convergence.data.loader import rebuild_dataloader, wrap_train_dataloader
from lightning_convergence.data.resizable import BatchSizeController, EpochShuffleSampler, ResizableBatchSampler

__all__ = [
    "BatchSizeController",
    "EpochShuffleSampler",
    "ResizableBatchSampler",
    "rebuild_dataloader",
    "wrap_train_dataloader",
]
