"""Tiny models for the early-stopping tests: three decoupled least-squares blocks that converge at different
speeds (input scales 2, 1, 0.5 give curvatures 4, 1, 0.25), so GradES must freeze ``fast`` < ``mid`` < ``slow``."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

SCALES = (2.0, 1.0, 0.5)


def blocks_data(n: int = 256, d: int = 4, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([s for s in SCALES for _ in range(d)])
    x = torch.randn(n, 3 * d, generator=g) * scale
    w = torch.randn(3, d, generator=g)
    y = torch.stack([x[:, k * d:(k + 1) * d] @ w[k] for k in range(3)], dim=1)
    return TensorDataset(x, y)


class Blocks(L.LightningModule):
    """``fast``, ``mid`` and ``slow`` each map their own input block to their own output (no coupling)."""

    def __init__(self, d: int = 4, optimizer: str = "sgd", lr: float = 0.1, momentum: float = 0.0,
                 weight_decay: float = 0.0, batch_size: int = 256) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fast, self.mid, self.slow = (nn.Linear(d, 1, bias=False) for _ in range(3))
        self.d, self.optimizer, self.lr = d, optimizer, lr
        self.momentum, self.weight_decay, self.batch_size = momentum, weight_decay, batch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b, c = x.split(self.d, dim=1)
        return torch.cat([self.fast(a), self.mid(b), self.slow(c)], dim=1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def train_dataloader(self) -> DataLoader:
        return DataLoader(blocks_data(d=self.d), batch_size=self.batch_size, shuffle=False)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)


class ParamTrace(L.Callback):
    """Records every parameter before each optimizer step (``trace[step][name]``) and at the end of fit."""

    def __init__(self) -> None:
        self.trace: dict[int, dict[str, torch.Tensor]] = {}
        self.final: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, i: int) -> None:
        self.trace[trainer.global_step] = {k: v.detach().clone() for k, v in pl_module.named_parameters()}

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.final = {k: v.detach().clone() for k, v in pl_module.named_parameters()}
