"""Synthetic least-squares and logistic-regression tasks whose optimum is known (for correctness tests)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_convergence._checks import check_choice, check_number

__all__ = ["SyntheticRegressionDataModule", "LinearModel", "make_regression_data"]

_TASKS = ("least_squares", "logistic")


def make_regression_data(
    n_samples: int, dim: int, noise_std: float, task: str = "least_squares", seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """Draw ``(x, y, w_true)``: ``x ~ N(0, I)``, ``y = x·w_true + noise`` (or Bernoulli(sigmoid) labels)."""
    check_choice("make_regression_data", "task", task, _TASKS)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_samples, dim, generator=g)
    w = torch.randn(dim, generator=g)
    z = x @ w
    if task == "least_squares":
        y = z + noise_std * torch.randn(n_samples, generator=g)
    else:
        y = (torch.rand(n_samples, generator=g) < torch.sigmoid(z)).float()
    return x, y, w


class SyntheticRegressionDataModule(LightningDataModule):
    """A fixed synthetic dataset; :attr:`optimum` is the exact minimiser of the mean squared error.

    Args:
        n_samples: dataset size. Default ``1024``.
        dim: features. Default ``10``.
        noise_std: label noise for least squares, ≥ 0. Default ``0.1``.
        task: ``"least_squares"`` or ``"logistic"``. Default ``"least_squares"``.
        batch_size: examples per batch and device. Default ``32``.
        seed: data seed. Default ``0``.
        shuffle: shuffle training batches (seeded by Lightning's sampler). Default ``True``.
    """

    def __init__(
        self, n_samples: int = 1024, dim: int = 10, noise_std: float = 0.1, task: str = "least_squares",
        batch_size: int = 32, seed: int = 0, shuffle: bool = True,
    ) -> None:
        super().__init__()
        check_number("SyntheticRegressionDataModule", "noise_std", noise_std, 0)
        self.x, self.y, self.w_true = make_regression_data(n_samples, dim, noise_std, task, seed)
        self.task = task
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.dataset = TensorDataset(self.x, self.y)

    @property
    def optimum(self) -> Tensor:
        """Least squares: the exact minimiser ``argmin_w mean((xw − y)²)`` (no bias). Logistic: ``w_true``."""
        if self.task == "least_squares":
            return torch.linalg.lstsq(self.x.double(), self.y.double().unsqueeze(1)).solution.squeeze(1).float()
        return self.w_true

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=self.shuffle)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=len(self.dataset))


class LinearModel(LightningModule):
    """A bias-free linear model trained with SGD; ``val_loss`` is the full-data loss.

    Args:
        dim: features. Default ``10``.
        task: ``"least_squares"`` (MSE) or ``"logistic"`` (binary cross-entropy). Default ``"least_squares"``.
        lr: SGD learning rate of the default optimizer. Default ``0.05``.
    """

    def __init__(self, dim: int = 10, task: str = "least_squares", lr: float = 0.05) -> None:
        super().__init__()
        check_choice("LinearModel", "task", task, _TASKS)
        self.save_hyperparameters()
        self.linear = nn.Linear(dim, 1, bias=False)
        nn.init.zeros_(self.linear.weight)
        self.task = task
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x).squeeze(-1)

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        if self.task == "least_squares":
            return F.mse_loss(out, y)
        return F.binary_cross_entropy_with_logits(out, y)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = self.loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", self.loss(self(x), y), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)
