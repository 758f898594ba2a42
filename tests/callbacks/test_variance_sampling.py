"""GradientVarianceSampling in a real Trainer: allocation = the GVM formula on the callback's own statistics, weights
delivered per batch, group resolution, temperature cooldown, acceptance rates, errors, and identical resume."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_convergence.callbacks import GradientVarianceSampling
from lightning_convergence.callbacks.variance_sampling import resolve_groups
from lightning_convergence.examples import DigitsDataModule, MLPClassifier
from lightning_convergence.sampling import (
    allocate_budget,
)
from tests.helpers.loggers import MemoryLogger


class WeightedMLP(MLPClassifier):
    """The documented one-line hook: per-example losses times ``self.sample_weights``."""

    uses_sample_weights = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen_weights: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen_weights.append(self.sample_weights.clone())
        return (F.cross_entropy(self(x), y, reduction="none") * self.sample_weights).mean()


def _trainer(max_steps, callbacks, logger=False, **kwargs):
    return Trainer(
        max_steps=max_steps, callbacks=callbacks, logger=logger, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", limit_val_batches=0, num_sanity_val_steps=0,
        log_every_n_steps=1, **kwargs,
    )


class _ScriptedGroups(LightningModule):
    """loss = mean(w · x): every example's gradient is its own x, so the group statistics are known by hand.
    Group 0 holds x = 1, group 1 holds x = 6 (16 examples each, label = group)."""

    uses_sample_weights = True

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append((x.flatten().clone(), self.sample_weights.clone(), self.sample_groups.clone()))
        return (self.w * x.flatten() * self.sample_weights).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        x = torch.cat([torch.ones(16), torch.full((16,), 6.0)]).unsqueeze(1)
        return DataLoader(TensorDataset(x, torch.tensor([0] * 16 + [1] * 16)), batch_size=8)


def _probe_loss(module, batch):
    return (module.w * batch[0].flatten()).mean()


def test_gvm_allocation_and_weights_against_hand_computation():
    # By hand: per-example gradient norms are exactly G_0 = 1 and G_1 = 6 (whatever w is), p_i = 1 (no filtering),
    # equal group sizes (π_i = 1/2). GVM: n_i ∝ π_i G_i / sqrt(p_i + α/p_i^(β−1)), the same denominator for both.
    # Window = 2 steps × 8 = 16 draws: one floor draw per group, the other 14 split 1 : 6 -> counts [1+2, 1+12].
    # Importance weights w_i = π_i / (n_i / 16): group 0 -> 0.5 / (3/16) = 8/3, group 1 -> 0.5 / (13/16) = 8/13.
    seed_everything(0)
    cb = GradientVarianceSampling(policy="gvm", check_every_n_steps=2, probe_per_group=4, batch_loss_fn=_probe_loss,
                                  log_per_item=True)
    model, logger = _ScriptedGroups(), MemoryLogger()
    _trainer(6, [cb], logger=logger, enable_checkpointing=False).fit(model)
    assert cb.sampler.counts.tolist() == [3, 13]
    assert logger.values("convergence/sampling/budget/0") == [3.0] * 4  # re-allocations at steps 0, 2, 4, 6
    assert logger.values("convergence/sampling/budget/1") == [13.0] * 4
    for x, weights, groups in model.seen:
        assert torch.equal(groups, (x == 6).long())  # the delivered group ids are the examples' own groups
        # float32 of 8/3 and 8/13: exact to 1 ulp.
        torch.testing.assert_close(weights, torch.where(x == 6, 8 / 13, 8 / 3).float(), rtol=1e-6, atol=0)
    # Kish ESS of each batch, (Σw)² / Σw², averaged over the 2 batches of each window (the log at steps 2, 4, 6).
    ess = [float(w.double().sum() ** 2 / (w.double() ** 2).sum()) for _, w, _ in model.seen]
    assert logger.values("convergence/sampling/effective_sample_size") == pytest.approx(
        [(ess[0] + ess[1]) / 2, (ess[2] + ess[3]) / 2, (ess[4] + ess[5]) / 2], rel=1e-12
    )  # both in float64 from the same float32 weights: summation order only


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_nonfinite_probe_follows_the_policy(policy, caplog):
    # From step 4 on the probe's loss is NaN (the training loss stays finite): it never enters the group statistics.
    def poisoned(module, batch):
        loss = _probe_loss(module, batch)
        return loss * float("nan") if module.trainer.global_step >= 4 else loss

    seed_everything(0)
    cb = GradientVarianceSampling(policy="gvm", check_every_n_steps=2, probe_per_group=4, batch_loss_fn=poisoned,
                                  on_nonfinite=policy)
    trainer = _trainer(8, [cb], enable_checkpointing=False)
    trainer.fit(_ScriptedGroups())
    assert "GradientVarianceSampling: non-finite probe gradients at optimizer step 4" in caplog.text
    assert cb.group_stats.value("grad_norm").tolist() == [1.0, 6.0]  # only the finite probes (steps 0, 2)
    assert cb.sampler.counts.tolist() == [3, 13]
    if policy == "stop":
        assert trainer.global_step == 4 and cb.group_stats.nonfinite_skipped_total == 1
    else:  # probes at 4, 6 and 8 skipped and counted; training ran to the end
        assert trainer.global_step == 8 and cb.group_stats.nonfinite_skipped_total == 3
        assert caplog.text.count("non-finite probe gradients") == 1  # warned once
        assert trainer.callback_metrics["convergence/sampling/nonfinite_skipped_total"] == 3


def test_rms_norm_statistic_gives_the_iid_optimum():
    seed_everything(0)
    cb = GradientVarianceSampling(policy="gvm", gvm_statistic="rms_norm", check_every_n_steps=2, probe_per_group=4)
    _trainer(2, [cb], enable_checkpointing=False).fit(WeightedMLP(hidden=(8,)), DigitsDataModule(batch_size=16))
    sizes, m = cb.sampler.group_sizes, cb.group_stats.value("grad_sq")
    assert torch.equal(cb.sampler.counts, allocate_budget("gvm", 32, sizes, grad_norms=m.sqrt(), min_per_group=1))


def test_resume_is_identical(tmp_path):
    def run(max_steps, ckpt_path=None, save=False):
        seed_everything(0)
        cb = GradientVarianceSampling(policy="gvm", check_every_n_steps=3, probe_per_group=4, seed=5)
        model = WeightedMLP(hidden=(16,))
        extra = [ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=7, save_top_k=-1)] if save else []
        trainer = _trainer(max_steps, [cb, *extra], enable_checkpointing=save)
        trainer.fit(model, DigitsDataModule(batch_size=16), ckpt_path=ckpt_path)
        return model, cb

    straight, cb_a = run(14)
    run(7, save=True)
    ckpt = next(tmp_path.glob("*step=7.ckpt"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's "dataloader is not resumable" warning: our callback is
        resumed, cb_b = run(14, ckpt_path=str(ckpt))
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    sa, sb = cb_a.state_dict(), cb_b.state_dict()
    assert sa["sampler"]["consumed"] == sb["sampler"]["consumed"] == 14 * 16
    torch.testing.assert_close(sa["sampler"]["window_counts"], sb["sampler"]["window_counts"], rtol=0, atol=0)
    for field in ("avg", "count"):
        for k, v in sa["group_stats"][field].items():
            torch.testing.assert_close(v, sb["group_stats"][field][k], rtol=0, atol=0)
    torch.testing.assert_close(torch.cat(straight.seen_weights[7:]), torch.cat(resumed.seen_weights))


def test_temperature_cooldown_and_no_reweighting():
    seed_everything(0)
    cb = GradientVarianceSampling(
        policy="temperature", check_every_n_steps=2, probe_per_group=0, reweight=False, min_per_group=0,
        start_temperature=4.0, end_temperature=1.0, cooldown_start_step=2, cooldown_steps=4,
    )
    model, logger = WeightedMLP(hidden=(8,)), MemoryLogger()
    _trainer(6, [cb], logger=logger, enable_checkpointing=False).fit(model, DigitsDataModule(batch_size=16))
    # Re-allocations at steps 0, 2, 4, 6: T = 4, 4, 2.5, 1.
    assert logger.values("convergence/sampling/temperature") == pytest.approx([4.0, 4.0, 2.5, 1.0])
    assert torch.equal(cb.sampler.counts, allocate_budget("uniform", 32, cb.sampler.group_sizes))
    assert all(torch.equal(w, torch.ones(16)) for w in model.seen_weights)


def test_acceptance_rates_enter_the_gvm_allocation():
    class Filtering(WeightedMLP):
        def training_step(self, batch, batch_idx):
            cb = self.trainer.callbacks[0]
            groups = self.sample_groups
            cb.record_acceptance(groups, groups >= 5)  # groups 0-4 never pass the filter: p = 0
            return super().training_step(batch, batch_idx)

    seed_everything(0)
    cb = GradientVarianceSampling(policy="gvm", check_every_n_steps=2, probe_per_group=4)
    _trainer(4, [cb], enable_checkpointing=False).fit(Filtering(hidden=(8,)), DigitsDataModule(batch_size=16))
    p = cb.group_stats.value("accept_rate", default=1.0)
    assert p.tolist() == [0.0] * 5 + [1.0] * 5
    assert cb.sampler.counts[:5].tolist() == [1] * 5  # p = 0 -> r = 0: only the floor of one draw


class _Labelled(Dataset):
    targets = [0, 1, 1, 2]

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return i


def test_group_resolution():
    assert resolve_groups(_Labelled()).tolist() == [0, 1, 1, 2]
    assert resolve_groups(_Labelled(), lambda ds, i: i % 2).tolist() == [0, 1, 0, 1]
    assert resolve_groups(TensorDataset(torch.zeros(3, 2), torch.tensor([2, 0, 1]))).tolist() == [2, 0, 1]
    with pytest.raises(TypeError, match="group_fn"):
        resolve_groups(TensorDataset(torch.zeros(3, 2), torch.zeros(3)))


def test_module_without_weights_is_warned():
    class Unweighted(MLPClassifier):
        uses_sample_weights = False  # a user module that reduces its loss without the weights

    seed_everything(0)
    cb = GradientVarianceSampling(check_every_n_steps=2, probe_per_group=2)
    with pytest.warns(UserWarning, match="uses_sample_weights"):
        _trainer(1, [cb], enable_checkpointing=False).fit(Unweighted(hidden=(8,)), DigitsDataModule(batch_size=16))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"policy": "gvmm"}, "policy"),
        ({"check_every_n_steps": 0}, "check_every_n_steps"),
        ({"probe_per_group": 1}, "probe_per_group"),
        ({"probe_per_group": 0}, "probe_per_group"),
        ({"min_per_group": 0}, "min_per_group"),
        ({"ema_beta": 1.0}, "ema_beta"),
        ({"alpha": -1.0}, "alpha"),
        ({"start_temperature": 0.0}, "start_temperature"),
        ({"cooldown_shape": "step"}, "cooldown_shape"),
        ({"gvm_statistic": "max"}, "gvm_statistic"),
    ],
)
def test_callback_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        GradientVarianceSampling(**kwargs)


def test_state_version_is_checked():
    with pytest.raises(RuntimeError, match="version"):
        GradientVarianceSampling().load_state_dict({"version": 99})


def test_loader_with_batch_sampler_and_bad_probe_batch_are_refused():
    from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

    from lightning_convergence.callbacks._common import probe_loss

    ds = TensorDataset(torch.zeros(4, 2), torch.tensor([0, 1, 0, 1]))
    loader = DataLoader(ds, batch_sampler=BatchSampler(SequentialSampler(ds), 2, False))
    with pytest.raises(TypeError, match="batch_size"):
        GradientVarianceSampling()._install(None, loader)
    with pytest.raises(TypeError, match="batch_to_inputs"):  # an output loss needs (inputs, targets) batches
        probe_loss("GradientVarianceSampling", None, torch.nn.functional.cross_entropy)(None, torch.zeros(3))
    with pytest.raises(RuntimeError, match="before fit"):
        GradientVarianceSampling().record_acceptance(torch.tensor([0]), torch.tensor([True]))


def test_works_under_adaptive_batch_size():
    from lightning_convergence.callbacks.adaptive_batch import AdaptiveBatchSize

    class Recording(WeightedMLP):
        def training_step(self, batch, batch_idx):
            assert self.sample_weights.numel() == len(batch[1])
            return super().training_step(batch, batch_idx)

    seed_everything(0)
    gvs = GradientVarianceSampling(check_every_n_steps=2, probe_per_group=2)
    adaptive = AdaptiveBatchSize(test="norm", eta=0.05, max_batch_size=128)
    model = Recording(hidden=(8,))
    trainer = _trainer(6, [gvs, adaptive], enable_checkpointing=False, accumulate_grad_batches=2)
    trainer.fit(model, DigitsDataModule(batch_size=16))
    loader = trainer.train_dataloader
    assert type(loader.batch_sampler).__name__ == "ResizableBatchSampler"
    assert loader.batch_sampler.sampler is gvs.sampler  # their batch sampler draws from our index sampler
    assert gvs.sampler.state_dict()["consumed"] == sum(w.numel() for w in model.seen_weights)
