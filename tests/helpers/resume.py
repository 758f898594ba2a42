"""Resume-anywhere harness: run a part straight, write checkpoints at every optimizer step and epoch end, resume from
each one in a fresh Trainer/module/callback, and compare the end states bit for bit.

A *case* is a :class:`Case`: how to build the part's callbacks and strategy, the optimizer family, and the run shape.
Each run ends by taking a :func:`snapshot` at ``on_train_end`` (parameters, optimizer and scheduler state, every
callback's ``state_dict``, the strategy's per-rank state), so the comparison covers what a checkpoint must carry.

World size 2 runs inside two forked processes that already share a gloo group (:func:`tests.helpers.dist.
run_processes`): Lightning sees ``LOCAL_RANK``/``WORLD_SIZE`` in the environment, treats the processes as externally
launched and reuses the group, so one fork pair runs every fit of a case (the straight run, the saving run and every
resume), each with a fresh Trainer, module, callbacks and strategy.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_convergence.data import (
    BatchSizeController,
    EpochShuffleSampler,
    ResizableBatchSampler,
    rebuild_dataloader,
    wrap_train_dataloader,
)

BATCH = 4  # examples per micro-batch and rank
STEPS_PER_EPOCH = 2  # optimizer steps per epoch
EPOCHS = 2


class TinyNet(LightningModule):
    """A 4→4→2 tanh MLP on 2-class data, cross-entropy weighted by ``sample_weights`` when a sampler sets them.

    The dataset has twice the examples an epoch reads (``limit_train_batches`` ends each epoch early, the case of
    issue #21), and a per-step ``StepLR`` so the scheduler's state moves at every step.
    """

    uses_sample_weights = True

    def __init__(self, optimizer: str = "sgd", world_size: int = 1, accumulation: int = 1) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        n = 2 * BATCH * world_size * accumulation * STEPS_PER_EPOCH
        self.x = torch.randn(n, 4, generator=g)
        self.y = (self.x[:, 0] + 0.5 * torch.randn(n, generator=g) > 0).long()
        self.net = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
        with torch.no_grad():  # seeded here, so every fresh module starts alike whatever the global RNG did
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.optimizer_name = optimizer
        self.sample_weights: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def per_sample_loss(self, out: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(out, y)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        losses = F.cross_entropy(self(x), y, reduction="none")
        if self.sample_weights is not None and self.sample_weights.numel() == losses.numel():
            losses = losses * self.sample_weights
        loss = losses.mean()
        self.log("train_loss", loss.detach())
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x[:BATCH], self.y[:BATCH]), batch_size=BATCH)

    def configure_optimizers(self) -> Any:
        if self.optimizer_name == "schedule_free":
            import schedulefree

            return schedulefree.SGDScheduleFree(self.parameters(), lr=0.1, momentum=0.9, warmup_steps=2)
        opt = _OPTIMIZERS[self.optimizer_name](self.parameters())
        if self.optimizer_name == "budget":  # total_steps=None: BudgetScheduleSync gives it the trainer's budget
            from lightning_convergence.optim import LinearDecay

            sched = LinearDecay(opt, warmup_steps=1)
        else:
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=BATCH, shuffle=True)


def _demo(params: Any) -> torch.optim.Optimizer:
    from lightning_convergence.optim import DeMo

    # 4-entry chunks with 2 sent: the 4x4 and 2x4 weights split into several chunks, so top-k really drops entries.
    return DeMo(params, lr=0.05, momentum_decay=0.9, topk=2, chunk_size=4)


def _onebit_adam(params: Any) -> torch.optim.Optimizer:
    from lightning_convergence.optim import OnebitAdam

    return OnebitAdam(params, lr=0.05, start_step=2)  # warm-up (DDP all-reduce) for 2 steps, then 1-bit momentum


def _sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


# The optimizer families a case can ask for (``Case.optimizer``); ``schedule_free`` is built in TinyNet itself.
_OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "sgd": _sgd, "budget": _sgd, "demo": _demo, "onebit_adam": _onebit_adam,
}


@dataclass
class Case:
    """One part under test: ``callbacks(world_size, accumulation)`` and ``strategy()`` build fresh instances for
    every run.

    ``owns_sampler``: the part installs its own resumable sampler; otherwise :class:`ResumablePosition` makes the
    tiny module's loader resume mid-epoch (a plain shuffled loader restarts its epoch on resume, whatever the part).
    """

    name: str
    callbacks: Callable[[int, int], list[Callback]] = lambda world_size, accumulation: []
    strategy: Callable[[], Any] | None = None
    optimizer: str = "sgd"
    owns_sampler: bool = False
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)


class ResumablePosition(Callback):
    """Test scaffolding: batch the train loader with a :class:`ResizableBatchSampler` over a per-epoch seeded
    shuffle, count what training consumed and checkpoint that position, so a mid-epoch resume continues the epoch."""

    def __init__(self) -> None:
        self.controller = BatchSizeController(BATCH)
        self._undo: Callable[[], None] | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._undo = wrap_train_dataloader(trainer, self._install)

    def _install(self, loader: DataLoader) -> DataLoader:
        inner = EpochShuffleSampler(loader.dataset, seed=0)  # under DDP Lightning swaps in a DistributedSampler
        return rebuild_dataloader(loader, batch_sampler=ResizableBatchSampler(inner, BATCH, False, self.controller))

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._undo is not None:
            self._undo()
            self._undo = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.controller.start_epoch(trainer.current_epoch)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.controller.start_epoch(trainer.current_epoch)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self.controller.consume(len(batch[0]))

    def state_dict(self) -> dict[str, Any]:
        return self.controller.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.controller.load_state_dict(state_dict)


class Snapshot(Callback):
    """Record the end state of a run at ``on_train_end`` (before the strategy's teardown)."""

    def __init__(self) -> None:
        self.state: dict[str, Any] | None = None

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.state = snapshot(trainer, pl_module)


def snapshot(trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
    """Everything a resume must reproduce, as CPU copies."""
    from lightning_convergence._rank_state import to_cpu

    strategy = trainer.strategy
    parts = {
        type(cb).__name__: to_cpu(cb.state_dict()) for cb in trainer.callbacks
        if type(cb).__module__.startswith("lightning_convergence")
    }
    if callable(getattr(strategy, "rank_state_dict", None)):
        parts["strategy"] = to_cpu(strategy.rank_state_dict())
    return {
        "global_step": trainer.global_step,
        "params": {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()},
        "optimizers": [to_cpu(o.state_dict()) for o in trainer.optimizers],
        "schedulers": [to_cpu(c.scheduler.state_dict()) for c in trainer.lr_scheduler_configs],
        "parts": parts,
    }


def differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Where two nested states differ (exactly: tensors bit for bit, NaN equal to NaN); empty when identical."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        if not (isinstance(a, Tensor) and isinstance(b, Tensor)) or a.shape != b.shape or a.dtype != b.dtype:
            return [f"{path}: {_short(a)} != {_short(b)}"]
        if torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                 and torch.equal(a.nan_to_num(), b.nan_to_num())):
            return []
        diff = (a.double() - b.double()).abs().nan_to_num(nan=math.inf).max().item()
        return [f"{path}: max |diff| {diff:.3g}"]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{path}: keys {sorted(map(str, set(a) ^ set(b)))} differ"]
        return [d for k in a for d in differences(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return []
    return [] if a == b else [f"{path}: {_short(a)} != {_short(b)}"]


def _short(x: Any) -> str:
    text = repr(x)
    return text if len(text) < 80 else text[:77] + "..."


def fit(case: Case, root: Path, world_size: int, accumulation: int, ckpt_path: str | None = None,
        savers: list[Callback] | None = None, extra: list[Callback] | None = None, stop: str = "epochs",
        logger: Any = False) -> dict[str, Any]:
    """One run of the case in a fresh Trainer/module/callbacks/strategy; returns its end :func:`snapshot`.

    ``stop``: ``"epochs"`` (``max_epochs=2``) or ``"steps"`` (``max_steps=4``, ``max_epochs=-1``: Lightning's loops
    restore differently in iteration-based training). ``logger``: the trainer's logger (none by default)."""
    snap = Snapshot()
    position = [] if case.owns_sampler else [ResumablePosition()]
    callbacks = [*position, *case.callbacks(world_size, accumulation), *(extra or []), *(savers or []), snap]
    kwargs: dict[str, Any] = dict(
        accelerator="cpu", devices=world_size, max_epochs=EPOCHS if stop == "epochs" else -1,
        max_steps=-1 if stop == "epochs" else EPOCHS * STEPS_PER_EPOCH,
        accumulate_grad_batches=accumulation, limit_train_batches=STEPS_PER_EPOCH * accumulation,
        limit_val_batches=1, num_sanity_val_steps=0, logger=logger, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=bool(savers), default_root_dir=str(root),
        deterministic=True, log_every_n_steps=1,
    )
    strategy = case.strategy() if case.strategy is not None else _plain_ddp() if world_size > 1 else None
    if strategy is not None:
        kwargs["strategy"] = strategy
    kwargs.update(case.trainer_kwargs)
    trainer = Trainer(callbacks=callbacks, **kwargs)
    trainer.fit(TinyNet(case.optimizer, world_size, accumulation), ckpt_path=ckpt_path)
    assert snap.state is not None
    return snap.state


def _plain_ddp() -> Any:
    from lightning.pytorch.strategies import DDPStrategy

    return DDPStrategy(process_group_backend="gloo")


def step_savers(directory: Path) -> list[Callback]:
    """Lightning's own writers: one checkpoint after every optimizer step, one at every training epoch's end and one
    at every end-of-epoch validation (``ModelCheckpoint``'s default placement when there is validation)."""
    return [
        ModelCheckpoint(dirpath=directory, filename="step{step}", every_n_train_steps=1, save_top_k=-1,
                        auto_insert_metric_name=False),
        ModelCheckpoint(dirpath=directory, filename="epoch{epoch}-step{step}-end", every_n_epochs=1, save_top_k=-1,
                        save_on_train_epoch_end=True, auto_insert_metric_name=False),
        ModelCheckpoint(dirpath=directory, filename="epoch{epoch}-step{step}-val", monitor="val_loss",
                        every_n_epochs=1, save_top_k=-1, save_on_train_epoch_end=False,
                        auto_insert_metric_name=False),
    ]


def resume_everywhere(case: Case, root: Path, world_size: int, accumulation: int, stop: str = "epochs",
                      ) -> dict[str, list[str]]:
    """The straight run, a run that saves at every step and epoch end, and a resume from each checkpoint but the
    end of fit. Returns ``{label: differences from the straight run}`` (all empty when the part resumes exactly)."""
    straight = fit(case, root / "straight", world_size, accumulation, stop=stop)
    ckpt_dir = root / "ckpt"
    saving = fit(case, root / "saving", world_size, accumulation, savers=step_savers(ckpt_dir), stop=stop)
    out = {"saving run": differences(saving, straight)}
    for path in sorted(ckpt_dir.glob("*.ckpt")):
        if torch.load(path, weights_only=False, map_location="cpu")["global_step"] >= straight["global_step"]:
            continue  # the end of fit: nothing left to run
        resumed = fit(case, root / f"from-{path.stem}", world_size, accumulation, ckpt_path=str(path), stop=stop)
        out[path.stem] = differences(resumed, straight)
    return out


def external_launch_env(rank: int, world_size: int) -> None:
    """Make Lightning treat this forked process as rank ``rank`` of an externally launched job (the group exists)."""
    os.environ.update(
        {"RANK": str(rank), "LOCAL_RANK": str(rank), "NODE_RANK": "0", "WORLD_SIZE": str(world_size),
         "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0"}
    )


class SaveSnapshot(Snapshot):
    """A :class:`Snapshot` that also writes itself to ``path`` (for runs in another process, such as the CLI)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if trainer.is_global_zero:
            torch.save(self.state, self.path)


class IssueNet(LightningModule):
    """The set-up filed in issue #21: a 32→32→2 tanh MLP, SGD (lr 0.05, momentum 0.9) with a per-step
    ``StepLR(step_size=5, gamma=0.7)``, batches of 8 from 256 examples (``limit_train_batches=8`` ends every epoch
    after a quarter of the data)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(256, 32, generator=g)
        self.y = (self.x[:, :4].sum(1) > 0).long()
        self.net = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 2))
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.7)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=8, shuffle=True)


def issue_fit(root: Path, world_size: int, ckpt_path: str | None = None, save: bool = False) -> dict[str, Any]:
    """One run of the issue's case (``AdaptiveBatchSize(max_batch_size=64)``, accumulation 2, 2 epochs); with
    ``save`` a ``ModelCheckpoint`` writes ``root/ckpt/epoch=<e>*.ckpt`` at every epoch end."""
    from lightning_convergence.callbacks import AdaptiveBatchSize

    snap = Snapshot()
    callbacks: list[Callback] = [AdaptiveBatchSize(max_batch_size=64), snap]
    if save:
        callbacks.insert(1, ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, every_n_epochs=1))
    trainer = Trainer(
        accelerator="cpu", devices=world_size, accumulate_grad_batches=2, limit_train_batches=8, deterministic=True,
        max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=save,
        default_root_dir=str(root), callbacks=callbacks,
        **({"strategy": _plain_ddp()} if world_size > 1 else {}),
    )
    trainer.fit(IssueNet(), ckpt_path=ckpt_path)
    assert snap.state is not None
    return snap.state
