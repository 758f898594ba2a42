"""Data-side plumbing the callbacks share: owning the train DataLoader's sampling."""

from lightning_convergence.data.loader import rebuild_dataloader, wrap_train_dataloader

__all__ = ["rebuild_dataloader", "wrap_train_dataloader"]
