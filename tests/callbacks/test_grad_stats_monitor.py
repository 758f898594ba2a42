"""GradientStatsMonitor against a hand-computed reference, in one process (accumulation) and on 2 gloo ranks."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import Trainer

from lightning_convergence import stats
from lightning_convergence.callbacks import GradientStatsMonitor
from lightning_convergence.examples import LinearModel, SyntheticRegressionDataModule
from tests.helpers.dist import DumpOnRanks, ddp_fork_strategy, load_rank_results
from tests.helpers.loggers import MemoryLogger

KEY = "convergence/grad_stats/"


def _data() -> SyntheticRegressionDataModule:
    return SyntheticRegressionDataModule(n_samples=64, dim=5, noise_std=0.5, batch_size=4, shuffle=False, seed=3)


def _reference(dm: SyntheticRegressionDataModule, micro_batches: list[list[int]], b_small: int) -> dict[str, float]:
    """At w = 0 the per-example MSE gradient is -2·y·x; micro-batch gradients are their means."""
    grads = [(-2 * dm.y[idx].unsqueeze(1) * dm.x[idx]).mean(0) for idx in micro_batches]
    big = torch.stack(grads).mean(0)
    sq_small = torch.stack([g.pow(2).sum() for g in grads]).mean()
    est = stats.estimate_noise(sq_small, big.pow(2).sum(), b_small, b_small * len(grads))
    return {
        "grad_l2_norm": big.norm().item(),
        "grad_l1_norm": big.abs().sum().item(),
        "trace_cov": est.trace_cov,
        "grad_sq_norm": est.grad_sq_norm,
        "noise_scale": est.noise_scale,
    }


def _trainer(**kwargs) -> Trainer:
    base = dict(
        accelerator="cpu", max_steps=3, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=1,
    )
    base.update(kwargs)
    return Trainer(**base)


def test_single_process_accumulation_matches_reference():
    dm = _data()
    logger = MemoryLogger()
    # lr = 0 keeps w = 0, so the reference gradients are closed-form; ema_beta = 0 logs the latest estimate.
    monitor = GradientStatsMonitor(log_every_n_steps=1, ema_beta=0.0)
    _trainer(devices=1, accumulate_grad_batches=2, logger=logger, callbacks=[monitor]).fit(LinearModel(5, lr=0.0), dm)
    logged: dict = {}  # step -> every metric logged at that step
    for step, metrics in logger.history:
        logged.setdefault(step, {}).update(metrics)
    for step in range(3):
        ref = _reference(dm, [list(range(8 * step, 8 * step + 4)), list(range(8 * step + 4, 8 * step + 8))], 4)
        for name, value in ref.items():
            if not math.isfinite(value):  # a negative |G|^2 estimate gives no noise scale: nothing is logged
                assert KEY + name not in logged[step], (step, name)
                continue
            assert logged[step][KEY + name] == pytest.approx(value, rel=1e-4), (step, name)
    assert logger.values(KEY + "nonfinite_skipped_total") == [0, 0, 0]
    assert all(v >= 0 for v in logger.values(KEY + "step_overhead_ms"))


def _history(trainer, pl_module):
    return [m for _, m in trainer.loggers[0].history] if trainer.is_global_zero else None


def test_two_ranks_match_reference(tmp_path):
    dm = _data()
    monitor = GradientStatsMonitor(log_every_n_steps=1, ema_beta=0.0)
    trainer = _trainer(
        devices=2, strategy=ddp_fork_strategy(), logger=MemoryLogger(),
        callbacks=[monitor, DumpOnRanks(tmp_path, _history)],
    )
    trainer.fit(LinearModel(5, lr=0.0), dm)
    history, none = load_rank_results(tmp_path, 2)
    assert none is None  # only rank 0 logs
    logged = [m for m in history if KEY + "grad_l2_norm" in m]
    assert len(logged) == 3
    # Lightning shuffles training data with DistributedSampler(seed=0, epoch 0): rank r takes perm[r::2].
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0)).tolist()
    for step, metrics in enumerate(logged):
        ref = _reference(dm, [perm[0::2][4 * step : 4 * step + 4], perm[1::2][4 * step : 4 * step + 4]], 4)
        for name, value in ref.items():
            if not math.isfinite(value):  # no estimate: the key is absent, never inf
                assert KEY + name not in metrics, (step, name)
                continue
            assert metrics[KEY + name] == pytest.approx(value, rel=1e-4), (step, name)


def test_no_noise_scale_without_two_batch_sizes_and_per_item_keys():
    logger = MemoryLogger()
    monitor = GradientStatsMonitor(log_every_n_steps=2, log_per_item=True)
    _trainer(devices=1, logger=logger, callbacks=[monitor], max_steps=4).fit(LinearModel(5), _data())
    assert len(logger.values(KEY + "grad_l2_norm")) == 2  # steps 0 and 2
    assert logger.values(KEY + "noise_scale") == []
    assert len(logger.values(KEY + "grad_l2_norm/linear.weight")) == 2


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nonfinite_gradients_follow_the_policy(policy, caplog):
    class NaNModel(LinearModel):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx) * float("nan")

    logger = MemoryLogger()
    monitor = GradientStatsMonitor(log_every_n_steps=1, on_nonfinite=policy)
    model = NaNModel(5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = _trainer(devices=1, logger=logger, callbacks=[monitor], max_steps=2, accumulate_grad_batches=2)
    trainer.fit(model, _data())
    # "stop" ends training at the first non-finite step (before: it trained on to max_steps); "skip" counts each.
    assert logger.values(KEY + "nonfinite_skipped_total") == ([1] if policy == "stop" else [1, 2])
    assert logger.values(KEY + "grad_l2_norm") == [] and logger.values(KEY + "noise_scale") == []
    assert not any(k.startswith(KEY + "grad_") for k in trainer.callback_metrics)  # no stale norm stays visible
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # no NaN step was applied
    assert "GradientStatsMonitor: non-finite gradients at optimizer step 0" in caplog.text


def test_state_round_trip_and_version_check():
    a = GradientStatsMonitor(ema_beta=0.5)
    a.tracker.update(stats.NoiseEstimate(grad_sq_norm=2.0, trace_cov=6.0))
    a.nonfinite_skipped_total = 3
    b = GradientStatsMonitor(ema_beta=0.5)
    b.load_state_dict(a.state_dict())
    assert b.tracker.noise_scale == pytest.approx(3.0) and b.nonfinite_skipped_total == 3
    with pytest.raises(RuntimeError, match="`version`"):
        b.load_state_dict({**a.state_dict(), "version": 99})


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"log_every_n_steps": 0}, "log_every_n_steps"), ({"norm_types": ["l3"]}, "norm_types"),
     ({"ema_beta": 1.0}, "ema_beta")],
)
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        GradientStatsMonitor(**kwargs)
