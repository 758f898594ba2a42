"""Data-side adapters: owning the train DataLoader's sampling, resizable batches, federated client shards."""

from lightning_convergence.data.federated import FederatedDataModule
from lightning_convergence.data.loader import rebuild_dataloader, wrap_train_dataloader
from lightning_convergence.data.resizable import BatchSizeController, EpochShuffleSampler, ResizableBatchSampler

__all__ = [
    "BatchSizeController",
    "EpochShuffleSampler",
    "FederatedDataModule",
    "ResizableBatchSampler",
    "rebuild_dataloader",
    "wrap_train_dataloader",
]
