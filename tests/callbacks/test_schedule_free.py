"""ScheduleFreeModeSwitch: train/eval at the right hooks, eval weights in checkpoints, resume, clear errors."""

from __future__ import annotations

import builtins
import glob
import importlib
import sys

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_convergence.callbacks import ScheduleFreeModeSwitch

schedulefree = pytest.importorskip("schedulefree")  # optional extra `optim`


def _data():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(32, 3, generator=gen)
    y = x @ torch.tensor([[1.0], [-1.0], [2.0]]) + 0.1 * torch.randn(32, 1, generator=gen)
    return x, y


class _SF(LightningModule):
    def __init__(self, plain: bool = False) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.plain = plain
        self.modes: list[tuple[str, bool]] = []

    def _mode(self) -> bool:
        opt = self.trainer.optimizers[0] if self.trainer.optimizers else None
        return bool(opt.param_groups[0]["train_mode"]) if opt is not None else False

    def training_step(self, batch, batch_idx):
        self.modes.append(("train", self._mode()))
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def validation_step(self, batch, batch_idx):
        self.modes.append(("val", self._mode()))

    def test_step(self, batch, batch_idx):
        pass

    def predict_step(self, batch, batch_idx):
        return self.layer(batch[0])

    def train_dataloader(self):
        return DataLoader(TensorDataset(*_data()), batch_size=4, shuffle=False)

    def val_dataloader(self):
        return DataLoader(TensorDataset(*_data()), batch_size=16, shuffle=False)

    def configure_optimizers(self):
        if self.plain:
            return torch.optim.SGD(self.parameters(), lr=0.1)
        return schedulefree.AdamWScheduleFree(self.parameters(), lr=0.05, warmup_steps=2)


def _trainer(tmp_path, callbacks, max_steps=16, **kw):
    return Trainer(max_steps=max_steps, accelerator="cpu", logger=False, callbacks=callbacks,
                   enable_progress_bar=False, enable_model_summary=False,
                   enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
                   default_root_dir=str(tmp_path), **kw)


def _reference_x_weights(steps: int) -> list[torch.Tensor]:
    """The same run by hand: train() before steps, eval() at the end, weights = x."""
    seed_everything(0)
    model = _SF()
    opt = model.configure_optimizers()
    x, y = _data()
    opt.train()
    for s in range(steps):
        i = (s % 8) * 4
        opt.zero_grad()
        torch.nn.functional.mse_loss(model.layer(x[i:i + 4]), y[i:i + 4]).backward()
        opt.step()
    opt.eval()
    return [p.detach().clone() for p in model.parameters()]


def test_schedule_free_modes_at_hooks_and_final_eval_weights(tmp_path):
    seed_everything(0)
    model = _SF()
    # val_check_interval=3: validation mid-epoch, after which training must continue on y (train mode).
    _trainer(tmp_path, [ScheduleFreeModeSwitch()], val_check_interval=3, num_sanity_val_steps=1).fit(model)
    assert all(mode for kind, mode in model.modes if kind == "train")
    assert all(not mode for kind, mode in model.modes if kind == "val")
    assert sum(kind == "val" for kind, _ in model.modes) >= 3
    assert not model.trainer.optimizers[0].param_groups[0]["train_mode"]  # eval after fit
    for p, r in zip(model.parameters(), _reference_x_weights(16)):
        torch.testing.assert_close(p.detach(), r, rtol=0, atol=1e-6)  # mode switches round x<->y in float32


def test_schedule_free_checkpoint_holds_eval_weights_and_resumes(tmp_path):
    seed_everything(0)
    model = _SF()
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ck"), every_n_train_steps=8, save_top_k=-1)
    _trainer(tmp_path, [ScheduleFreeModeSwitch(), ckpt], limit_val_batches=0).fit(model)
    path = glob.glob(str(tmp_path / "ck" / "*step=8*.ckpt"))[0]
    saved = torch.load(path, weights_only=False)
    assert saved["optimizer_states"][0]["param_groups"][0]["train_mode"] is False
    ref8 = _reference_x_weights(8)
    for key, r in zip(["layer.weight", "layer.bias"], ref8):
        torch.testing.assert_close(saved["state_dict"][key], r, rtol=0, atol=1e-6)  # x, not y

    seed_everything(0)
    model2 = _SF()
    _trainer(tmp_path, [ScheduleFreeModeSwitch()], limit_val_batches=0).fit(model2, ckpt_path=path)
    for p, q in zip(model.parameters(), model2.parameters()):
        # y -> x (saved) -> y (resumed) costs float32 rounding of two interpolations per parameter.
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-5)
    assert all(mode for kind, mode in model2.modes if kind == "train")


def test_schedule_free_test_and_predict_run_in_eval(tmp_path):
    seed_everything(0)
    model = _SF()
    trainer = _trainer(tmp_path, [ScheduleFreeModeSwitch()], max_steps=4)
    trainer.fit(model)
    opt = trainer.optimizers[0]
    x_weights = [p.detach().clone() for p in model.parameters()]
    opt.train()  # pretend something left it in train mode (weights y)
    for stage in (trainer.validate, trainer.test, trainer.predict):
        opt.train()
        stage(model, dataloaders=model.val_dataloader(), **({} if stage.__name__ == "predict" else {"verbose": False}))
        assert not opt.param_groups[0]["train_mode"], stage.__name__
        for p, x in zip(model.parameters(), x_weights):
            torch.testing.assert_close(p.detach(), x, rtol=0, atol=1e-6)


def test_schedule_free_rejects_plain_optimizer(tmp_path):
    with pytest.raises(TypeError, match="SGD"):
        _trainer(tmp_path, [ScheduleFreeModeSwitch()], max_steps=2).fit(_SF(plain=True))


def test_schedule_free_lazy_import_names_extra(monkeypatch):
    import lightning_convergence.optim as optim

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "schedulefree":
            raise ImportError("no schedulefree")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "schedulefree", raising=False)
    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"lightning-convergence\[optim\]"):
        optim.AdamWScheduleFree  # noqa: B018
    monkeypatch.setattr(builtins, "__import__", real_import)
    assert importlib.import_module("lightning_convergence.optim").AdaGradNorm is not None
