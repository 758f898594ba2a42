"""Data-side adapters: owning the train DataLoader's sampling, resizable batches, federated client shards."""

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


def __getattr__(name: str) -> object:
    # FederatedDataModule is a LightningDataModule: imported on first use so that the torch-only modules of this
    # package (loader, resizable) never pull in Lightning.
    if name == "FederatedDataModule":
        from lightning_convergence.data.federated import FederatedDataModule

        return FederatedDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
