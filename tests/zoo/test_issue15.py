"""One test per finding of issue #15 (any LightningModule, unchanged); each failed on the code before the fix."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningDataModule, Trainer
from torch.utils.data import DataLoader, TensorDataset, default_collate

from lightning_convergence.callbacks import (
    AdaptiveBatchSize,
    ConvergenceEarlyStopping,
    GradientEarlyStopping,
    GradientStatsMonitor,
)
from lightning_convergence.stats.module_grads import ExampleGradients, slice_batch, training_step_loss
from lightning_convergence.strategies.local_sgd import LocalSGDStrategy
from tests.helpers.loggers import MemoryLogger
from tests.zoo.models import ZOO, GRUClassifier, TupleMLP, ZooEntry

pytestmark = [pytest.mark.timeout(120), pytest.mark.filterwarnings("ignore::UserWarning")]

ZOO_BY_NAME = {z.name: z for z in ZOO}


def _fit(entry: ZooEntry, callbacks, max_steps: int = 6, logger=None, module=None, **kw) -> Trainer:
    torch.manual_seed(0)
    trainer = Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=logger or False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, log_every_n_steps=1, callbacks=callbacks, **kw)
    trainer.fit(module or entry.module(), entry.datamodule())
    return trainer


# -- item 1 -----------------------------------------------------------------------------------------------------
def test_item1_adaptive_batch_defaults_stay_within_one_epoch_and_warn():
    # accumulate 2, no max_batch_size, eta tiny (the test always demands more): before, the batch grew without
    # bound (millions of examples on a 2-3k set). Now it stops at one epoch (256 examples) and warns once.
    cb = AdaptiveBatchSize(eta=0.01)
    with pytest.warns(UserWarning, match="above one epoch of the training set") as record:
        _fit(ZOO_BY_NAME["tuple_mlp"], [cb], max_steps=12, accumulate_grad_batches=2)
    assert cb.global_batch_size <= 256 and cb.target_batch_size <= 256
    assert sum("one epoch" in str(w.message) for w in record) == 1


def test_item1_auto_estimator_says_what_it_chose(caplog):
    cb = AdaptiveBatchSize()
    with caplog.at_level(logging.INFO):
        _fit(ZOO_BY_NAME["tuple_mlp"], [cb], max_steps=3)
    assert cb.estimator == "per_sample" and "chose 'per_sample'" in caplog.text
    assert cb.history and all(math.isfinite(h["demanded"]) for h in cb.history)


# -- item 2 -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tuple_mlp", "dict_cnn", "gru"])
def test_item2_example_gradients_equal_one_backward_per_example(name):
    # Reference: autograd on each example alone through the module's own training_step (no vmap, no slicing code
    # of ours beyond picking the example). vmap (MLP, CNN) and the GRU's per-example fallback must match it.
    entry = ZOO_BY_NAME[name]
    torch.manual_seed(0)
    module, data = entry.module(), entry.data()
    batch = default_collate([data[i] for i in range(5)])
    grads, scale = ExampleGradients("test")(module, batch)
    assert scale == 1.0
    for i in range(5):
        module.zero_grad()
        training_step_loss(module, slice_batch(batch, slice(i, i + 1))).backward()
        for n, p in module.named_parameters():
            # float32 sums in a different order (vmap batches them): agreement to 1e-5 relative.
            torch.testing.assert_close(grads[n][i], p.grad, rtol=1e-5, atol=1e-7)


def test_item2_rnn_falls_back_once_with_a_warning_and_chunks_are_means():
    entry = ZOO_BY_NAME["gru"]
    torch.manual_seed(0)
    module, data = GRUClassifier(), entry.data()
    batch = default_collate([data[i] for i in range(8)])
    probe = ExampleGradients("AdaptiveBatchSize")
    with pytest.warns(UserWarning, match="one backward pass per micro-batch slice") as record:
        grads, scale = probe(module, batch, chunks=4)
    assert scale == 2.0 and len(record) == 1
    per_example, _ = probe(module, batch)  # the second call does not warn again (checked by pytest.warns count)
    for n in grads:  # a chunk's gradient is the mean of its examples' gradients (mean-reduced loss)
        torch.testing.assert_close(grads[n], per_example[n].view(4, 2, *per_example[n].shape[1:]).mean(1),
                                   rtol=1e-5, atol=1e-7)


# -- item 4 -----------------------------------------------------------------------------------------------------
class _NaNAtStep5(TupleMLP):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.trainer.global_step == 5 else loss


@pytest.mark.parametrize("make", [
    lambda: GradientStatsMonitor(log_every_n_steps=1),
    lambda: ConvergenceEarlyStopping(check_every_n_steps=1),
    lambda: ConvergenceEarlyStopping(rules=["loss_curve"], check_every_n_steps=1),
    lambda: GradientEarlyStopping(signal="grad"),
    lambda: GradientEarlyStopping(),
    lambda: AdaptiveBatchSize(),
], ids=["monitor", "convergence_noise", "convergence_curve", "grades_grad", "grades_weights", "adaptive_batch"])
def test_item4_a_nan_at_step_5_stops_every_callback_with_a_message(make, caplog):
    cb = make()
    trainer = _fit(ZOO_BY_NAME["tuple_mlp"], [cb], max_steps=20, module=_NaNAtStep5())
    assert trainer.global_step <= 6, "trained on past the NaN"  # before: every callback ran to max_steps
    assert "non-finite" in caplog.text and type(cb).__name__ in caplog.text
    for k, v in trainer.callback_metrics.items():
        assert math.isfinite(float(v)) or not k.startswith("convergence/"), k


def test_item4_diloco_on_one_device_stops_before_nan_enters_the_replica(caplog):
    module = _NaNAtStep5()
    strategy = LocalSGDStrategy(outer="diloco", schedule=2)
    _fit(ZOO_BY_NAME["tuple_mlp"], [], max_steps=20, module=module, strategy=strategy)
    assert all(torch.isfinite(p).all() for p in module.parameters())  # before: NaN weights
    assert strategy._skipped == 1 and "LocalSGDStrategy: non-finite gradients" in caplog.text


# -- item 6 -----------------------------------------------------------------------------------------------------
def test_item6_one_owner_per_key_and_no_inf():
    logger = MemoryLogger()
    monitor = GradientStatsMonitor(log_every_n_steps=1, ema_beta=0.0)
    stop = ConvergenceEarlyStopping(check_every_n_steps=1)
    _fit(ZOO_BY_NAME["tuple_mlp"], [monitor, stop], max_steps=6, logger=logger, accumulate_grad_batches=2)
    # Only the user's monitor writes grad_stats keys (before: the early-stopping callback's internal monitor wrote
    # the same keys at the same steps with other values), and no value is inf or NaN.
    for step, metrics in logger.history:
        for key, value in metrics.items():
            assert math.isfinite(value), (step, key)
    per_step = [m["convergence/grad_stats/grad_l2_norm"] for _, m in logger.history
                if "convergence/grad_stats/grad_l2_norm" in m]
    assert len(per_step) == 6  # one value per step: only one writer
    assert stop.monitor is not None and stop.monitor.last_metrics == {}


# -- item 5 -----------------------------------------------------------------------------------------------------
def test_item5_nested_class_path_error_reaches_the_user_first(tmp_path, monkeypatch):
    from lightning_convergence.cli import main

    root = Path(__file__).resolve().parents[2]
    cfg = tmp_path / "bad.yaml"
    text = (root / "configs" / "compressed_ddp" / "ef21_topk.yaml").read_text()
    cfg.write_text(text.replace("k_fraction: 0.01", "k_fraction: 0").replace("k_fraction: 0.1", "k_fraction: 0"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as info:
        main(["fit", "--config", str(cfg), "--trainer.fast_dev_run=1", "--trainer.devices=1",
              "--trainer.logger=false"])
    assert str(info.value) == "TopK: `k_fraction` must be a finite number in (0, 1], got 0.0."


# -- item 7 -----------------------------------------------------------------------------------------------------
def test_item7_federated_datamodule_in_yaml_keeps_the_inner_hparams(tmp_path, monkeypatch):
    from lightning_convergence.cli import main

    cfg = tmp_path / "fed.yaml"
    cfg.write_text("""
trainer: {max_steps: 2, logger: false, enable_checkpointing: false, enable_progress_bar: false, limit_val_batches: 0,
          strategy: {class_path: lightning_convergence.strategies.AsyncFederatedStrategy,
                     init_args: {num_clients: 2, local_steps: 1}}}
model: {class_path: lightning_convergence.examples.LinearModel, init_args: {dim: 5}}
data:
  class_path: lightning_convergence.data.FederatedDataModule
  init_args:
    num_clients: 2
    server_steps_per_epoch: 2
    datamodule: {class_path: tests.zoo.test_issue15.HparamsData, init_args: {n_train: 32}}
""")
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(cfg)])  # before: AttributeError 'AttributeDict' object has no attribute 'n_train'


class HparamsData(LightningDataModule):
    """A datamodule that reads its own arguments back through ``self.hparams`` (``save_hyperparameters()``)."""

    def __init__(self, n_train: int = 64, batch_size: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str | None = None) -> None:
        x = torch.randn(self.hparams.n_train, 5, generator=torch.Generator().manual_seed(0))
        self.ds = TensorDataset(x, x.sum(1))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.ds, batch_size=self.hparams.batch_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.ds, batch_size=self.hparams.batch_size)


# -- item 8 -----------------------------------------------------------------------------------------------------
def test_item8_local_sgd_on_one_process_warns():
    with pytest.warns(UserWarning, match="one process: there are no other replicas"):
        _fit(ZOO_BY_NAME["tuple_mlp"], [], max_steps=2, strategy=LocalSGDStrategy(outer="diloco", schedule=2))


def test_item8_cli_says_nothing_about_wandb_without_a_wandb_logger(tmp_path, monkeypatch, capsys):
    from lightning_convergence import cli

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.chdir(tmp_path)
    root = Path(__file__).resolve().parents[2]
    cli.main(["fit", "--config", str(root / "configs" / "quickstart.yaml"), "--trainer.logger=false",
              "--trainer.max_steps=1", "--trainer.enable_progress_bar=false"])
    out = capsys.readouterr()
    assert "W&B" not in out.err and "W&B" not in out.out


# -- item 9 -----------------------------------------------------------------------------------------------------
def test_item9_grades_logs_its_signal_by_default():
    logger = MemoryLogger()
    _fit(ZOO_BY_NAME["gru"], [GradientEarlyStopping()], max_steps=4, logger=logger)
    medians = [m["convergence/stop/signal_median"] for _, m in logger.history if "convergence/stop/signal_median" in m]
    maxima = [m["convergence/stop/signal_max"] for _, m in logger.history if "convergence/stop/signal_max" in m]
    assert medians and all(0 <= a <= b for a, b in zip(medians, maxima))
