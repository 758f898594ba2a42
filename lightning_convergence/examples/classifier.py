"""A small MLP classifier on scikit-learn's bundled 8x8 digits (1797 real images; no download)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_convergence._checks import check_int_at_least, check_number

__all__ = ["DigitsDataModule", "MLPClassifier"]


class DigitsDataModule(LightningDataModule):
    """scikit-learn's digits (10 classes, 64 features scaled to [0, 1]) with a seeded train/validation split.

    Args:
        batch_size: examples per batch and device, ≥ 1. Default ``64``.
        val_fraction: share of the 1797 images held out for validation, in (0, 1). Default ``0.2``.
        seed: seed of the split (not of training). Default ``0``.
        num_workers: DataLoader workers. Default ``0``: the data is tiny and in memory.

    Raises:
        ValueError: for ``batch_size`` < 1 or ``val_fraction`` outside (0, 1).
        ImportError: if scikit-learn is missing (``pip install 'lightning-convergence[examples]'``).
    """

    num_features = 64
    num_classes = 10

    def __init__(self, batch_size: int = 64, val_fraction: float = 0.2, seed: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        check_int_at_least("DigitsDataModule", "batch_size", batch_size, 1)
        check_number("DigitsDataModule", "val_fraction", val_fraction, 0, 1, low_open=True, high_open=True)
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.num_workers = num_workers
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        try:
            from sklearn.datasets import load_digits
        except ImportError as err:  # pragma: no cover - depends on the install
            raise ImportError(
                "DigitsDataModule needs scikit-learn: pip install 'lightning-convergence[examples]'"
            ) from err
        data = load_digits()
        x = torch.tensor(data.data, dtype=torch.float32) / 16.0
        y = torch.tensor(data.target, dtype=torch.long)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
        n_val = int(round(len(x) * self.val_fraction))
        val_idx, train_idx = perm[:n_val], perm[n_val:]
        self.train_set = TensorDataset(x[train_idx], y[train_idx])
        self.val_set = TensorDataset(x[val_idx], y[val_idx])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


class MLPClassifier(LightningModule):
    """A multilayer perceptron for flat features; logs ``train_loss``, ``val_loss`` and ``val_acc``.

    Args:
        num_features: input width. Default ``64`` (digits).
        num_classes: output classes. Default ``10``.
        hidden: hidden widths, one entry per hidden layer. Default ``(128, 128)``.
        lr: learning rate of the default optimizer (Adam) used when the config names none. Default ``3e-3``.
    """

    #: Declares that ``training_step`` applies ``self.sample_weights`` (set per batch by GradientVarianceSampling).
    uses_sample_weights = True

    def __init__(
        self, num_features: int = 64, num_classes: int = 10, hidden: tuple[int, ...] | list[int] = (128, 128),
        lr: float = 3e-3,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        width = num_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        # Importance weights from GradientVarianceSampling keep the weighted loss an unbiased estimate of the
        # uniform one; without that callback there are none.
        weights = getattr(self, "sample_weights", None)
        losses = F.cross_entropy(self(x), y, reduction="none")
        loss = (losses * weights).mean() if weights is not None else losses.mean()
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _evaluate(self, batch: Any, stage: str) -> None:
        x, y = batch
        logits = self(x)
        self.log(f"{stage}_loss", F.cross_entropy(logits, y), prog_bar=True, sync_dist=True)
        acc = (logits.argmax(dim=1) == y).float().mean()
        self.log(f"{stage}_acc", acc, prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)
