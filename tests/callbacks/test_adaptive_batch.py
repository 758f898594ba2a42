"""AdaptiveBatchSize on one process: Lightning's accumulation contract, analytic test statistics, growth, LR
scaling, per-device growth through the resizable sampler, and errors."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from torch.utils.data import DataLoader, TensorDataset

from lightning_convergence.callbacks import AdaptiveBatchSize
from lightning_convergence.data.batch_plan import plan_batch
from tests.callbacks.adaptive_batch_helpers import LeastSquares, RecordLR, make_trainer
from tests.helpers.loggers import MemoryLogger

# -- Lightning's contract: accumulate_grad_batches is read at every batch ------------------------------------------


class _IndexModule(LightningModule):
    """loss = w · mean(batch); with lr 0 the gradient of each step is the accumulated mean of the batch values."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.grads: list[float] = []

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.w * x.mean()

    def on_before_optimizer_step(self, optimizer):
        self.grads.append(float(self.w.grad))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.arange(24).float()), batch_size=1)


class _SetAccumulation(Callback):
    def __init__(self, at_step: int, value: int) -> None:
        self.at_step, self.value = at_step, value

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at_step:
            trainer.accumulate_grad_batches = self.value
            self.at_step = -1


def test_lightning_reads_accumulate_grad_batches_at_every_batch():
    """The mechanism AdaptiveBatchSize relies on. If Lightning cached the factor, or stopped dividing the loss by
    it, or decided steps other than by ``batch_idx % accumulate_grad_batches``, this test fails."""
    model = _IndexModule()
    make_trainer(accumulate_grad_batches=2, max_steps=5, callbacks=[_SetAccumulation(2, 4)]).fit(model)
    # Steps 1-2 average batches {0,1}, {2,3}; the change at batch 4 (a multiple of 4) gives {4..7}, {8..11}, ...
    assert model.grads == [0.5, 2.5, 5.5, 9.5, 13.5]

    misaligned = _IndexModule()
    make_trainer(accumulate_grad_batches=2, max_steps=4, callbacks=[_SetAccumulation(2, 3)]).fit(misaligned)
    # Changing to 3 after batch 4 (not a multiple of 3): Lightning does not zero the gradient at batch 4 (it zeroes
    # when batch_idx % 3 == 0), steps after batch 5 with {4, 5} scaled by 1/3 *plus* the previous step's gradient 2.5.
    # This is why AdaptiveBatchSize defers a change until the epoch's batch count is a multiple of the new factor.
    assert misaligned.grads == [0.5, 2.5, pytest.approx(2.5 + (4 + 5) / 3), 7.0]


# -- planning ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((40, 1, 8, 2, None, None, False), (8, 5)),  # accumulation only: 8 × 5 = 40
        ((40, 2, 8, 2, None, None, False), (8, 3)),  # rounded up to a multiple of 16: 48
        ((40, 2, 8, 2, None, 40, False), (8, 2)),  # rounding up would pass max_batch_size: round down to 32
        ((100, 1, 8, 2, 64, None, True), (50, 2)),  # per-device at an epoch boundary: 2 × 50 = 100 ≤ 2 × 64
        ((100, 2, 8, 2, 64, None, True), (50, 1)),
        ((300, 1, 8, 2, 64, 256, True), (51, 5)),  # k = 5, 60 per device would pass 256: 51 × 5 = 255
    ],
)
def test_plan_batch(args, expected):
    assert plan_batch(*args) == expected


def test_plan_batch_keeps_two_micro_batches_for_the_microbatch_estimator():
    assert plan_batch(100, 1, 8, 2, 128, None, True) == (100, 1)
    assert plan_batch(100, 1, 8, 2, 128, None, True, min_accumulation=2) == (50, 2)


# -- the test statistic against its analytic value -------------------------------------------------------------------


def _analytic_norm_demand(model: LeastSquares, eta: float, batch: int) -> float:
    """Per-example gradients of (xᵀw − y)² at w = 0 with x ~ N(0, I), y = xᵀw* + ε: G = −2w*,
    Σ = 4((‖w*‖² + σ²) I + w*w*ᵀ); the test uses the batch mean, E‖ḡ‖² = ‖G‖² + tr Σ / B."""
    dd, d, sigma2 = float(model.w_true.pow(2).sum()), model.w_true.numel(), 0.25
    trace = 4 * ((dd + sigma2) * d + dd)
    return trace / (eta**2 * (4 * dd + trace / batch))


def test_per_sample_statistic_matches_analytic_value():
    model = LeastSquares(n=8192, batch_size=4096, lr=0.0)
    logger = MemoryLogger()
    cb = AdaptiveBatchSize(
        test="norm", eta=0.1, variance_estimator="per_sample", per_sample_max_examples=4096, smoothing=0.0,
        max_batch_size=4096,
    )
    make_trainer(max_steps=2, callbacks=[cb], logger=logger, log_every_n_steps=1).fit(model)
    demanded = logger.values("convergence/batch/test_statistic")
    assert len(demanded) == 2
    expected = _analytic_norm_demand(model, 0.1, 4096)
    # 4096 examples: the trace estimate's relative error is ~2/sqrt(4096) ≈ 3%; ‖ḡ‖² adds ~1.5%.
    for value in demanded:
        assert value == pytest.approx(expected, rel=0.08)
    assert logger.values("convergence/batch/batch_size") == [4096, 4096]  # max_batch_size holds it


def test_microbatch_statistic_matches_analytic_value():
    """32 micro-batches of 64 per step, 30 steps at fixed weights, smoothed: the micro-batch estimator agrees."""
    model = LeastSquares(n=2048, batch_size=64, lr=0.0)
    cb = AdaptiveBatchSize(test="norm", eta=0.1, smoothing=0.95, max_batch_size=2048)
    make_trainer(max_steps=30, max_epochs=-1, accumulate_grad_batches=32, callbacks=[cb]).fit(model)
    expected = _analytic_norm_demand(model, 0.1, 2048)
    # 30 steps × 32 samples ≈ 960 micro-batch samples (EMA 0.95 keeps ~all): ~2·sqrt(2/960) ≈ 9% error at 2 sd.
    assert cb.last_demanded == pytest.approx(expected, rel=0.15)
    assert cb.global_batch_size == 2048 and cb.accumulation == 32


# -- growth ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["microbatch", "per_sample"])
def test_batch_grows_as_the_loss_approaches_the_optimum(estimator):
    torch.manual_seed(0)
    model = LeastSquares(n=1024, batch_size=8, lr=0.05)
    cb = AdaptiveBatchSize(
        test="norm", eta=0.5, max_batch_size=256, max_growth_factor=2.0, variance_estimator=estimator,
        smoothing=0.9,
    )
    make_trainer(max_epochs=4, accumulate_grad_batches=2, callbacks=[cb]).fit(model)
    sizes = [h["batch_size"] for h in cb.history]
    assert sizes[0] == 16 and all(a <= b for a, b in zip(sizes, sizes[1:]))
    assert sizes[-1] >= 64
    # Demand rises as the loss falls: early demands are small, late ones large.
    early = sum(h["demanded"] for h in cb.history[:5]) / 5
    late = sum(h["demanded"] for h in cb.history[-5:]) / 5
    assert late > 4 * early
    assert model.full_loss() < 0.5 * float((model.y**2).mean())
    # The real batch is per-device × accumulation; the sampler kept the per-device batch (no per-device growth).
    assert set(model.batch_sizes) == {8}
    assert cb.samples_seen_total == 8 * len(model.batch_sizes)
    assert cb.global_batch_size == 8 * cb.accumulation


def test_inner_product_augmented_and_noise_scale_rules_grow_too():
    for test in ("inner_product", "augmented", "noise_scale"):
        model = LeastSquares(n=512, batch_size=8, lr=0.05)
        cb = AdaptiveBatchSize(test=test, theta=0.5, nu=1.0, max_batch_size=128, smoothing=0.9)
        make_trainer(max_epochs=3, accumulate_grad_batches=2, callbacks=[cb]).fit(model)
        assert cb.global_batch_size > 16, test
        # Only the short last step of an epoch (one micro-batch: no variance) gives no measurement (nan).
        skipped = [h for h in cb.history if math.isnan(h["demanded"])]
        assert len(skipped) <= 3 and all(not math.isinf(h["demanded"]) for h in cb.history), test
        assert cb.nonfinite_skipped_total == 0


@pytest.mark.parametrize(("scaling", "power"), [("linear", 1.0), ("sqrt", 0.5), ("none", 0.0)])
def test_lr_scaling_follows_the_real_batch(scaling, power):
    model = LeastSquares(n=1024, batch_size=8, lr=0.01, scheduler=True)
    rec = RecordLR()
    cb = AdaptiveBatchSize(test="norm", eta=0.5, max_batch_size=128, lr_scaling=scaling)
    trainer = make_trainer(max_epochs=3, accumulate_grad_batches=2, callbacks=[cb, rec])
    trainer.fit(model)
    ratio = cb.global_batch_size / 16
    assert ratio > 1
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.01 * ratio**power)
    # The lr of every step is the initial lr times the scaled ratio of the batch in force at that step.
    assert rec.lrs[0] == pytest.approx(0.01) and all(a <= b for a, b in zip(rec.lrs, rec.lrs[1:]))
    assert trainer.lr_scheduler_configs[0].scheduler.base_lrs[0] == pytest.approx(0.01 * ratio**power)


def test_per_device_batch_grows_at_epoch_boundaries_through_the_sampler():
    model = LeastSquares(n=512, batch_size=8, lr=0.05)
    cb = AdaptiveBatchSize(test="norm", eta=0.5, max_batch_size=256, max_per_device_batch_size=32)
    trainer = make_trainer(
        max_epochs=4, accumulate_grad_batches=2, callbacks=[cb], reload_dataloaders_every_n_epochs=1,
        limit_val_batches=1.0,
    )
    trainer.fit(model)
    assert cb.controller.batch_size > 8
    assert max(model.batch_sizes) > 8  # the DataLoader really produced larger batches (the last resize is unused)
    # At the last epoch boundary accumulation was traded for the largest per-device batch (32), keeping at least 2
    # micro-batches per step (the estimator's minimum).
    assert cb.accumulation == max(2, math.ceil(cb.target_batch_size / 32))
    # Lightning recounted the batches after each resize, so end-of-epoch validation ran in every epoch.
    assert model.val_epochs == 4
    assert cb.global_batch_size == cb.controller.batch_size * cb.accumulation


def test_min_batch_size_applies_at_the_start():
    model = LeastSquares(n=256, batch_size=8)
    cb = AdaptiveBatchSize(min_batch_size=40, max_batch_size=40, eta=10.0)
    make_trainer(max_steps=2, accumulate_grad_batches=2, callbacks=[cb]).fit(model)
    assert cb.accumulation == 5 and cb.global_batch_size == 40


# -- errors ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"test": "bogus"}, "test"), ({"lr_scaling": "cube"}, "lr_scaling"),
        ({"variance_estimator": "x"}, "variance_estimator"), ({"eta": 0}, "eta"), ({"theta": -1}, "theta"),
        ({"nu": float("nan")}, "nu"), ({"check_every_n_steps": 0}, "check_every_n_steps"),
        ({"min_batch_size": 0}, "min_batch_size"), ({"min_batch_size": 8, "max_batch_size": 4}, "max_batch_size"),
        ({"max_growth_factor": 1.0}, "max_growth_factor"), ({"smoothing": 1.0}, "smoothing"),
        ({"noise_ema_beta": -0.1}, "noise_ema_beta"), ({"per_sample_max_examples": 1}, "per_sample_max_examples"),
        ({"max_per_device_batch_size": 0}, "max_per_device_batch_size"),
    ],
)
def test_invalid_arguments(kwargs, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        AdaptiveBatchSize(**kwargs)
    with pytest.raises(TypeError, match="`loss_fn`"):
        AdaptiveBatchSize(loss_fn=3)


def test_setup_conflicts():
    with pytest.raises(ValueError, match="accumulate_grad_batches"):
        make_trainer(max_steps=1, callbacks=[AdaptiveBatchSize(variance_estimator="microbatch")]).fit(LeastSquares())
    with pytest.raises(ValueError, match="reload_dataloaders_every_n_epochs"):
        make_trainer(
            max_steps=1, accumulate_grad_batches=2, callbacks=[AdaptiveBatchSize(max_per_device_batch_size=16)]
        ).fit(LeastSquares())
    with pytest.raises(RuntimeError, match="GradientAccumulationScheduler"):
        make_trainer(
            max_steps=1, callbacks=[AdaptiveBatchSize(), GradientAccumulationScheduler({0: 2})]
        ).fit(LeastSquares())

    class Manual(LeastSquares):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(RuntimeError, match="automatic optimization"):
        make_trainer(max_steps=1, callbacks=[AdaptiveBatchSize(variance_estimator="per_sample")]).fit(Manual())

    class NoLoss(LeastSquares):
        per_sample_loss = None

    # Without a per-example loss, the per-sample path differentiates the module's own training_step.
    trainer = make_trainer(max_steps=2, callbacks=[AdaptiveBatchSize(variance_estimator="per_sample")])
    trainer.fit(NoLoss())
    assert trainer.global_step == 2


def test_state_version_is_checked():
    with pytest.raises(RuntimeError, match="`version`"):
        AdaptiveBatchSize().load_state_dict({"version": 0})


def test_logged_keys_match_the_docstring():
    model = LeastSquares(n=256, batch_size=8)
    logger = MemoryLogger()
    make_trainer(
        max_steps=4, accumulate_grad_batches=2, callbacks=[AdaptiveBatchSize(max_batch_size=64)], logger=logger,
        log_every_n_steps=2,
    ).fit(model)
    keys = {k for _, m in logger.history for k in m if k.startswith("convergence/")}
    expected = {
        f"convergence/batch/{n}" for n in (
            "batch_size", "samples_seen_total", "test_statistic", "noise_scale", "accumulate_grad_batches",
            "per_device_batch_size", "step_overhead_ms", "nonfinite_skipped_total",
        )
    }
    assert keys == expected
    assert all(f"``{k}``" in AdaptiveBatchSize.__doc__ for k in expected)
    assert len(logger.values("convergence/batch/batch_size")) == 2  # steps 0 and 2: the trainer's cadence


def test_nonfinite_statistics_are_skipped_and_counted():
    model = LeastSquares(n=256, batch_size=8, lr=0.0, shuffle=False)
    model.x[20, 0] = float("nan")  # the 3rd micro-batch (step 1) has a NaN gradient
    cb = AdaptiveBatchSize(eta=0.05, max_batch_size=64, on_nonfinite="skip")
    make_trainer(max_steps=2, accumulate_grad_batches=2, callbacks=[cb]).fit(model)
    assert cb.nonfinite_skipped_total == 1
    assert math.isnan(cb.history[1]["demanded"])
    assert cb.history[1]["target"] == cb.history[0]["target"]  # the skipped step demanded nothing
    assert all(math.isfinite(v) for v in cb.tracker.state_dict()["trace"].values())  # never folded into the EMAs


@pytest.mark.parametrize("world_size", [1, 2])
def test_streaming_norm_statistics_equal_the_stored_micro_batch_statistics(world_size, tmp_path):
    """The norm test streams Σ‖x_i‖² (no gradient copies); the augmented test stores the micro-batch gradients and
    calls sample_grad_stats. At fixed weights and a fixed batch both must measure the same tr Σ and ‖ḡ‖²."""
    from tests.helpers.dist import DumpOnRanks, ddp_fork_strategy, load_rank_results

    def run(test: str, directory):
        model = LeastSquares(n=512, batch_size=8, lr=0.0, shuffle=False)
        cb = AdaptiveBatchSize(test=test, max_batch_size=32 * world_size, theta=0.5, nu=1.0)
        extra = {"devices": 2, "strategy": ddp_fork_strategy()} if world_size == 2 else {}
        dump = DumpOnRanks(directory, lambda t, m: {
            k: next(c for c in t.callbacks if isinstance(c, AdaptiveBatchSize))._emas[k].value
            for k in ("trace_cov", "grad_sq_norm")
        } | {"noise": next(c for c in t.callbacks if isinstance(c, AdaptiveBatchSize)).tracker.noise_scale})
        make_trainer(max_steps=6, max_epochs=-1, accumulate_grad_batches=4, callbacks=[cb, dump], **extra).fit(model)
        return load_rank_results(directory, world_size)[0]

    streamed, stored = run("norm", tmp_path / "norm"), run("augmented", tmp_path / "aug")
    for key in ("trace_cov", "grad_sq_norm", "noise"):
        # float32 gradients summed in different orders (1e-6) and a cancellation Σ‖x‖² − n‖x̄‖² (here ~10x).
        assert streamed[key] == pytest.approx(stored[key], rel=1e-4), key
