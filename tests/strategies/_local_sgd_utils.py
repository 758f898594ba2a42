"""Shared pieces of the LocalSGDStrategy tests: a tiny network on synthetic regression and a ddp_fork fit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer, seed_everything
from torch import nn

from lightning_convergence.examples import SyntheticRegressionDataModule
from tests.helpers.dist import DumpOnRanks, fork_strategy_kwargs, load_rank_results


class TinyNet(LightningModule):
    """A 10→8→1 tanh network (optionally with BatchNorm, whose running stats are float buffers)."""

    def __init__(self, opt: str = "sgd", lr: float = 0.05, momentum: float = 0.9, batchnorm: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(10, 8)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(8))
        layers += [nn.Tanh(), nn.Linear(8, 1)]
        self.net = nn.Sequential(*layers)
        self.opt, self.lr, self.momentum = opt, lr, momentum

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self.net(x).squeeze(-1), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.mse_loss(self.net(x).squeeze(-1), y), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.opt == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


def rank_dump(trainer: Any, module: LightningModule) -> dict[str, Any]:
    return {
        "params": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "optimizer": trainer.optimizers[0].state_dict(),
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("convergence/")},
        "strategy_state": trainer.strategy.rank_state_dict() if hasattr(trainer.strategy, "rank_state_dict") else None,
    }


def fit(
    strategy_cls: type,
    out: Path,
    max_steps: int,
    *,
    module_kwargs: dict | None = None,
    callbacks: list | None = None,
    ckpt_path: str | None = None,
    n_samples: int = 64,
    val: bool = False,
    **strategy_kwargs: Any,
) -> list[dict[str, Any]]:
    """Fit TinyNet on 2 forked gloo ranks (batch 8 per rank) and return each rank's :func:`rank_dump`."""
    seed_everything(0)
    model = TinyNet(**(module_kwargs or {}))
    data = SyntheticRegressionDataModule(n_samples=n_samples, dim=10, batch_size=8, seed=0)
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy=strategy_cls(**fork_strategy_kwargs(), **strategy_kwargs),
        max_steps=max_steps, max_epochs=-1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=bool(callbacks and any(type(c).__name__ == "ModelCheckpoint" for c in callbacks)),
        limit_val_batches=1.0 if val else 0, num_sanity_val_steps=0, log_every_n_steps=1,
        callbacks=[*(callbacks or []), DumpOnRanks(out, rank_dump)], default_root_dir=str(out),
    )
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return load_rank_results(out, 2)
