"""AdaptiveBatchSize across ranks and across a resume: 2-rank DDP decides as 1 rank with the same global batch, and
a mid-epoch checkpoint continues identically."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback
from torch.utils.data import Sampler

from lightning_convergence.callbacks import AdaptiveBatchSize
from tests.callbacks.adaptive_batch_helpers import LeastSquares, make_trainer
from tests.helpers.dist import DumpOnRanks, ddp_fork_strategy, load_rank_results, params_snapshot


class _InterleavedDistributedOrder(Sampler[int]):
    """One process reading, micro-batch by micro-batch, what 2 DDP ranks read from ``DistributedSampler(shuffle=True,
    seed=0)``: rank 0's first micro-batch, rank 1's first, rank 0's second, ... (so with twice the accumulation the
    single process averages exactly the same examples per step)."""

    def __init__(self, n: int, micro_batch: int, world_size: int = 2, seed: int = 0) -> None:
        self.n, self.micro_batch, self.world_size, self.seed, self.epoch = n, micro_batch, world_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        shards = [perm[r :: self.world_size] for r in range(self.world_size)]
        per_rank = len(shards[0])
        for start in range(0, per_rank, self.micro_batch):
            for shard in shards:
                yield from shard[start : start + self.micro_batch]

    def __len__(self) -> int:
        return self.n


def _callback() -> AdaptiveBatchSize:
    # η small: every test demands far more than twice the batch, so the growth cap decides the sizes (16, 32, 64,
    # 128) and both layouts can realise them exactly; the demanded values themselves are compared below.
    return AdaptiveBatchSize(test="norm", eta=0.05, max_growth_factor=2.0, max_batch_size=128, smoothing=0.5)


def _dump(trainer, pl_module):
    cb = next(c for c in trainer.callbacks if isinstance(c, AdaptiveBatchSize))
    return {"history": cb.history, "params": params_snapshot(pl_module), "accumulation": cb.accumulation}


def test_two_ranks_decide_like_one_rank_with_the_same_global_batch(tmp_path, monkeypatch):
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)  # Lightning seeds DistributedSampler with it (default 0)
    steps = 8
    ddp_model = LeastSquares(n=512, batch_size=8, lr=0.02, shuffle=False)
    make_trainer(
        devices=2, strategy=ddp_fork_strategy(), max_steps=steps, max_epochs=-1,
        callbacks=[_callback(), DumpOnRanks(tmp_path, _dump)],
    ).fit(ddp_model)
    r0, r1 = load_rank_results(tmp_path, 2)

    single = LeastSquares(n=512, batch_size=8, lr=0.02, sampler=_InterleavedDistributedOrder(512, 8))
    cb = _callback()
    make_trainer(max_steps=steps, max_epochs=-1, accumulate_grad_batches=2, callbacks=[cb]).fit(single)

    assert r0["history"] == r1["history"]  # every rank took the same decisions
    assert [h["batch_size"] for h in r0["history"]] == [h["batch_size"] for h in cb.history]
    assert [h["target"] for h in r0["history"]] == [h["target"] for h in cb.history]
    assert r0["history"][-1]["batch_size"] == 128 and r0["accumulation"] == 8 and cb.accumulation == 16
    # Same examples per step, so the same statistics up to float summation order.
    for mine, theirs in zip(cb.history, r0["history"]):
        assert mine["demanded"] == pytest.approx(theirs["demanded"], rel=1e-3, abs=1.0)
    for name, value in params_snapshot(single).items():
        torch.testing.assert_close(r0["params"][name], value, rtol=1e-5, atol=1e-6)


class _SaveAt(Callback):
    def __init__(self, step: int, path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and self.path is not None:
            trainer.save_checkpoint(self.path)
            self.path = None


def _resume_callback() -> AdaptiveBatchSize:
    return AdaptiveBatchSize(test="norm", eta=0.5, max_batch_size=256, lr_scaling="sqrt", smoothing=0.9)


def test_resume_mid_epoch_continues_identically(tmp_path):
    total, half = 30, 15
    straight = LeastSquares(n=512, batch_size=8, lr=0.05, scheduler=True)
    cb_a = _resume_callback()
    make_trainer(max_steps=total, max_epochs=-1, accumulate_grad_batches=2, callbacks=[cb_a]).fit(straight)

    ckpt = tmp_path / "mid.ckpt"
    first = LeastSquares(n=512, batch_size=8, lr=0.05, scheduler=True)
    cb_b = _resume_callback()
    make_trainer(
        max_steps=half, max_epochs=-1, accumulate_grad_batches=2, callbacks=[cb_b, _SaveAt(half, ckpt)]
    ).fit(first)
    state = torch.load(ckpt, weights_only=True)["callbacks"][cb_b.state_key]
    assert 0 < state["sampler"]["consumed"] < 512  # a mid-epoch checkpoint
    assert state["global_batch_size"] > 16  # the batch had grown before the checkpoint

    resumed = LeastSquares(n=512, batch_size=8, lr=0.05, scheduler=True)
    cb_c = _resume_callback()
    trainer = make_trainer(max_steps=total, max_epochs=-1, accumulate_grad_batches=2, callbacks=[cb_c])
    trainer.fit(resumed, ckpt_path=ckpt)

    assert cb_c.history == cb_a.history[len(cb_b.history):]
    assert first.batch_sizes + resumed.batch_sizes == straight.batch_sizes
    assert cb_c.state_dict() == cb_a.state_dict()
    for name, value in params_snapshot(straight).items():
        torch.testing.assert_close(params_snapshot(resumed)[name], value, rtol=0, atol=0)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(
        0.05 * (cb_a.global_batch_size / 16) ** 0.5
    )


def _dump_sizes(trainer, pl_module):
    cb = next(c for c in trainer.callbacks if isinstance(c, AdaptiveBatchSize))
    loader = trainer.train_dataloader
    return {
        "history": cb.history, "per_device": cb.controller.batch_size, "accumulation": cb.accumulation,
        "seen": pl_module.batch_sizes, "inner": type(loader.batch_sampler.sampler).__name__,
        "batch_sampler": type(loader.batch_sampler).__name__,
    }


@pytest.mark.parametrize("estimator", ["microbatch", "per_sample"])
def test_two_ranks_grow_the_per_device_batch_through_the_resizable_sampler(tmp_path, estimator):
    """Under DDP Lightning re-creates our batch sampler around a DistributedSampler; the shared controller still
    resizes it at epoch boundaries, identically on both ranks (accumulation 1: the 2 ranks are the 2 samples)."""
    model = LeastSquares(n=256, batch_size=8, lr=0.05, shuffle=True)
    cb = AdaptiveBatchSize(
        test="norm", eta=0.3, max_batch_size=128, max_per_device_batch_size=32, variance_estimator=estimator,
    )
    make_trainer(
        devices=2, strategy=ddp_fork_strategy(), max_epochs=3, reload_dataloaders_every_n_epochs=1,
        callbacks=[cb, DumpOnRanks(tmp_path, _dump_sizes)],
    ).fit(model)
    r0, r1 = load_rank_results(tmp_path, 2)
    assert r0["history"] == r1["history"]
    assert r0["inner"] == "DistributedSampler" and r0["batch_sampler"] == "ResizableBatchSampler"
    assert r0["seen"] == r1["seen"]  # same per-device batch sizes on both ranks, batch by batch
    assert max(r0["seen"]) > 8  # the per-device batch really grew
    assert r0["history"][-1]["batch_size"] > 16


def _dump_resume(trainer, pl_module):
    cb = next(c for c in trainer.callbacks if isinstance(c, AdaptiveBatchSize))
    return {"params": params_snapshot(pl_module), "history": cb.history, "state": cb.state_dict()}


def test_two_rank_resume_in_the_second_epoch_continues_identically(tmp_path):
    """Mid-epoch of epoch 1 on 2 ranks: the DistributedSampler's epoch and the consumed examples are restored, and
    the batch size, accumulation, statistics and parameters continue exactly as in the uninterrupted run."""
    total, half = 24, 14

    def run(directory, max_steps, callbacks, ckpt=None):
        model = LeastSquares(n=256, batch_size=8, lr=0.05, shuffle=True)
        make_trainer(
            devices=2, strategy=ddp_fork_strategy(), max_steps=max_steps, max_epochs=-1,
            callbacks=[*callbacks, DumpOnRanks(directory, _dump_resume)],
        ).fit(model, ckpt_path=ckpt)
        return load_rank_results(directory, 2)

    cb_kwargs = dict(test="norm", eta=0.5, max_batch_size=64, lr_scaling="sqrt", smoothing=0.9)
    straight = run(tmp_path / "a", total, [AdaptiveBatchSize(**cb_kwargs)])
    ckpt = tmp_path / "mid.ckpt"
    first = run(tmp_path / "b", half, [AdaptiveBatchSize(**cb_kwargs), _SaveAt(half, ckpt)])
    state = torch.load(ckpt, weights_only=True)["callbacks"][AdaptiveBatchSize(**cb_kwargs).state_key]
    assert state["sampler"]["epoch"] == 1 and 0 < state["sampler"]["consumed"] < 128  # mid-epoch, second epoch
    resumed = run(tmp_path / "c", total, [AdaptiveBatchSize(**cb_kwargs)], ckpt=ckpt)
    for rank in range(2):
        assert resumed[rank]["history"] == straight[rank]["history"][len(first[rank]["history"]):]
        assert resumed[rank]["state"] == straight[rank]["state"]
        for name, value in straight[rank]["params"].items():
            torch.testing.assert_close(resumed[rank]["params"][name], value, rtol=0, atol=0)


@pytest.mark.parametrize("on_train_epoch_end", [True, False])
def test_resume_from_an_end_of_epoch_checkpoint_continues_identically(tmp_path, on_train_epoch_end):
    """Saved in `on_train_epoch_end` (ModelCheckpoint's default with one validation per epoch: after this callback's
    epoch-boundary re-plan) or at the end-of-epoch validation (before it: Lightning runs the epoch-end hooks on
    resume), with the sampler's epoch fully consumed."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(max_epochs, callbacks, ckpt=None, root=None):
        model = LeastSquares(n=256, batch_size=8, lr=0.05, scheduler=True)
        cb = _resume_callback()
        make_trainer(
            max_epochs=max_epochs, accumulate_grad_batches=2, callbacks=[cb, *callbacks], limit_val_batches=1,
            default_root_dir=root or tmp_path, enable_checkpointing=bool(callbacks),
        ).fit(model, ckpt_path=ckpt)
        return model, cb

    straight, cb_a = fit(3, [])
    saver = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=on_train_epoch_end
    )
    first, cb_b = fit(2, [saver])
    ckpt = sorted((tmp_path / "ckpt").glob("epoch=1*.ckpt"))[0]
    resumed, cb_c = fit(3, [], ckpt=ckpt)
    assert cb_c.history == cb_a.history[len(cb_b.history):]
    assert cb_c.state_dict() == cb_a.state_dict()
    for name, value in params_snapshot(straight).items():
        torch.testing.assert_close(params_snapshot(resumed)[name], value, rtol=0, atol=0)
