"""Shared pieces of the AdaptiveBatchSize tests: a least-squares module with a per-example loss, a trainer factory."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

from lightning_convergence.examples import make_regression_data


class LeastSquares(LightningModule):
    """Bias-free linear least squares, loss mean((xᵀw − y)²); records every training batch's size and the loss."""

    def __init__(
        self, n: int = 512, dim: int = 5, noise_std: float = 0.5, batch_size: int = 8, lr: float = 0.05,
        seed: int = 0, shuffle: bool = True, sampler: Sampler | None = None, scheduler: bool = False,
    ) -> None:
        super().__init__()
        self.x, self.y, self.w_true = make_regression_data(n, dim, noise_std, "least_squares", seed)
        self.linear = nn.Linear(dim, 1, bias=False)
        nn.init.zeros_(self.linear.weight)
        self.batch_size, self.lr, self.shuffle = batch_size, lr, shuffle
        self.sampler, self.scheduler = sampler, scheduler
        self.batch_sizes: list[int] = []
        self.losses: list[float] = []
        self.val_epochs = 0

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x).squeeze(-1)

    def per_sample_loss(self, out: Tensor, y: Tensor) -> Tensor:
        return (out - y).pow(2).mean()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        self.batch_sizes.append(len(x))
        loss = (self(x) - y).pow(2).mean()
        self.losses.append(float(loss.detach()))
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.val_epochs += 1

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        if not self.scheduler:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self) -> DataLoader:
        ds = TensorDataset(self.x, self.y)
        if self.sampler is not None:
            return DataLoader(ds, batch_size=self.batch_size, sampler=self.sampler)
        return DataLoader(ds, batch_size=self.batch_size, shuffle=self.shuffle)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x[:8], self.y[:8]), batch_size=8)

    def full_loss(self) -> float:
        with torch.no_grad():
            return float((self(self.x) - self.y).pow(2).mean())


def make_trainer(**kwargs: Any) -> Trainer:
    defaults: dict[str, Any] = dict(
        accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )
    defaults.update(kwargs)
    return Trainer(**defaults)


class RecordLR(Callback):
    """Records the first param group's lr before every optimizer step."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.lrs.append(float(optimizer.param_groups[0]["lr"]))
