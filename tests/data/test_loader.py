"""The train-dataloader hook: every way of passing data to fit, and DDP's sampler handling."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, SequentialSampler, TensorDataset

from lightning_convergence.data import rebuild_dataloader, wrap_train_dataloader
from tests.helpers.dist import DumpOnRanks, fork_strategy_kwargs, load_rank_results


class _Controller:
    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size


class _ControlledBatchSampler(BatchSampler):
    """A batch sampler whose size lives in a shared controller (Lightning may re-instantiate the sampler)."""

    def __init__(self, sampler, batch_size: int, drop_last: bool, controller: _Controller) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.controller = controller

    def __iter__(self):
        batch = []
        for idx in self.sampler:
            batch.append(idx)
            if len(batch) == self.controller.batch_size:
                yield batch
                batch = []
        if batch and not self.drop_last:
            yield batch


class _Recorder(LightningModule):
    def __init__(self, n: int = 32) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.seen: list[list[int]] = []
        self.n = n

    def training_step(self, batch, batch_idx):
        (x,) = batch
        self.seen.append(x.squeeze(1).long().tolist())
        return self.layer(x).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.arange(self.n).float().unsqueeze(1)), batch_size=4)


class _ResizeOnSetup(Callback):
    """Installs a controlled batch sampler and doubles the batch size after the second step."""

    def __init__(self) -> None:
        self.controller = _Controller(4)
        self.undo = None

    def setup(self, trainer, pl_module, stage):
        def transform(loader):
            bs = _ControlledBatchSampler(SequentialSampler(loader.dataset), 4, False, self.controller)
            return rebuild_dataloader(loader, batch_sampler=bs)

        self.undo = wrap_train_dataloader(trainer, transform)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 2:
            self.controller.batch_size = 8

    def teardown(self, trainer, pl_module, stage):
        self.undo()


def _trainer(**kwargs) -> Trainer:
    defaults = dict(
        accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    defaults.update(kwargs)
    return Trainer(**defaults)


def test_batch_size_changes_mid_epoch_from_module_source():
    model = _Recorder()
    cb = _ResizeOnSetup()
    _trainer(callbacks=[cb]).fit(model)
    sizes = [len(b) for b in model.seen]
    # Two batches of 4, then the controller's 8 takes effect at the next batch: 8 + 8 + 8 = 24 remaining indices.
    assert sizes == [4, 4, 8, 8, 8]
    assert sum(model.seen, []) == list(range(32))
    assert "train_dataloader" not in vars(model)  # undone at teardown


def test_direct_dataloader_and_datamodule_sources():
    model = _Recorder()
    loader = model.train_dataloader()
    _trainer(callbacks=[_ResizeOnSetup()]).fit(model, train_dataloaders=loader)
    assert [len(b) for b in model.seen] == [4, 4, 8, 8, 8]

    from lightning.pytorch import LightningDataModule

    class DM(LightningDataModule):
        def train_dataloader(self):
            return _Recorder().train_dataloader()

    model2 = _Recorder()
    _trainer(callbacks=[_ResizeOnSetup()]).fit(model2, datamodule=DM())
    assert [len(b) for b in model2.seen] == [4, 4, 8, 8, 8]


def test_rebuild_dataloader_validates_arguments():
    loader = DataLoader(TensorDataset(torch.zeros(4)), batch_size=2)
    with pytest.raises(ValueError, match="exactly one of `sampler` and `batch_sampler`"):
        rebuild_dataloader(loader)
    with pytest.raises(ValueError, match="`batch_size`"):
        rebuild_dataloader(loader, batch_sampler=BatchSampler(SequentialSampler(range(4)), 2, False), batch_size=3)
    with pytest.raises(TypeError, match="`loader`"):
        rebuild_dataloader([1, 2], sampler=SequentialSampler(range(2)))


def test_ddp_reinstantiates_batch_sampler_with_distributed_sampler(tmp_path):
    """Under 2-rank DDP, Lightning shards our batch sampler's index sampler; the controller still resizes."""
    model = _Recorder(n=32)
    trainer = _trainer(
        devices=2, strategy=_ddp(), callbacks=[_ResizeOnSetup(), DumpOnRanks(tmp_path, _dump_seen)],
        use_distributed_sampler=True,
    )
    trainer.fit(model)
    r0, r1 = load_rank_results(tmp_path, 2)
    assert r0["sampler"] == "DistributedSampler" and r1["sampler"] == "DistributedSampler"
    # Each rank sees 16 of the 32 indices (disjoint), first two batches of 4 then batches of 8.
    assert [len(b) for b in r0["seen"]] == [4, 4, 8]
    assert set(sum(r0["seen"], [])).isdisjoint(sum(r1["seen"], []))
    assert sorted(sum(r0["seen"], []) + sum(r1["seen"], [])) == list(range(32))


def _ddp():
    from lightning.pytorch.strategies import DDPStrategy

    return DDPStrategy(**fork_strategy_kwargs())


def _dump_seen(trainer, pl_module):
    loader = trainer.train_dataloader
    return {"seen": pl_module.seen, "sampler": type(loader.batch_sampler.sampler).__name__}


def test_distributed_sampler_subclass_is_left_in_place(tmp_path):
    class MySampler(DistributedSampler):
        pass

    class Install(Callback):
        def setup(self, trainer, pl_module, stage):
            def transform(loader):
                s = MySampler(loader.dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False)
                return rebuild_dataloader(loader, sampler=s)

            self.undo = wrap_train_dataloader(trainer, transform)

    def dump(trainer, pl_module):
        return type(trainer.train_dataloader.sampler).__name__

    trainer = _trainer(devices=2, strategy=_ddp(), callbacks=[Install(), DumpOnRanks(tmp_path, dump)])
    trainer.fit(_Recorder())
    assert load_rank_results(tmp_path, 2) == ["MySampler", "MySampler"]
