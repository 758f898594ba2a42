"""ConvergenceEarlyStopping in real Trainers: the noise-dominated rule on least squares with a known optimum (stops
after convergence, not before; single process with accumulation and 2-rank DDP), the loss-curve rule with a real LR
scheduler, state round trip, errors."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_convergence.callbacks.convergence_stop import (
    ConvergenceEarlyStopping,
    ConvergenceStopReason,
    _simulate_scheduler,
)
from lightning_convergence.examples import LinearModel, SyntheticRegressionDataModule
from lightning_convergence.stopping import forecast_lrs
from tests.helpers.dist import DumpOnRanks, ddp_fork_strategy, load_rank_results
from tests.helpers.loggers import MemoryLogger

N, DIM, NOISE = 1024, 10, 0.1
# Least squares with x ~ N(0, I): excess loss = |w - w*|^2 (up to sampling of X), and the ERM itself is only
# accurate to sigma^2 d / N. "Converged" = excess below twice that statistical error (factor 2: the norm-test
# statistic is estimated from 4 micro-batches per step, so it fires within noise of the exact crossing).
EPS = 2 * NOISE**2 * DIM / N


class ExcessLoss(L.Callback):
    """Full-data excess loss over the exact optimum before each optimizer step."""

    def __init__(self, dm: SyntheticRegressionDataModule) -> None:
        self.x, self.y, self.w_opt = dm.x, dm.y, dm.optimum
        self.excess: dict[int, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step not in self.excess:
            with torch.no_grad():
                w = pl_module.linear.weight.squeeze(0)
                loss = (self.x @ w - self.y).pow(2).mean() - (self.x @ self.w_opt - self.y).pow(2).mean()
            self.excess[trainer.global_step] = float(loss)


def _trainer(callbacks, max_steps: int, **kwargs) -> L.Trainer:
    kwargs.setdefault("logger", False)
    return L.Trainer(
        max_steps=max_steps, accelerator="cpu", enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks, **kwargs,
    )


def _first_converged(excess: dict[int, float]) -> int:
    return min(s for s, v in excess.items() if v < EPS and all(excess[t] < EPS for t in excess if t > s))


def test_noise_rule_stops_after_convergence_not_before() -> None:
    L.seed_everything(0)
    dm = SyntheticRegressionDataModule(n_samples=N, dim=DIM, noise_std=NOISE, batch_size=256)
    logger = MemoryLogger()
    cb = ConvergenceEarlyStopping(rules=["noise_dominated"], check_every_n_steps=2, patience=3, eta=1.0)
    excess = ExcessLoss(dm)
    trainer = _trainer([cb, excess], max_steps=400, accumulate_grad_batches=4, logger=logger, log_every_n_steps=2)
    trainer.fit(LinearModel(dim=DIM, lr=0.05), dm)
    converged = _first_converged(excess.excess)
    assert cb.stopping_reason is ConvergenceStopReason.NOISE_DOMINATED and "norm test" in cb.stopping_reason_message
    assert cb.stopped_step is not None and trainer.global_step == cb.stopped_step < 400
    # After convergence ...
    assert cb.stopped_step >= converged
    # ... and not long after: the excess is still above 1/100 of the threshold 10 steps before the stop.
    assert excess.excess[cb.stopped_step - 10] > EPS / 100
    assert logger.values("convergence/stop/stopped")[-1] == 1.0
    assert logger.values("convergence/stop/required_batch")[0] < N


def test_noise_rule_two_ranks_without_accumulation(tmp_path) -> None:
    # The two batch sizes come from the ranks (128 per rank, 256 per step): the cross-rank estimator.
    L.seed_everything(0)
    dm = SyntheticRegressionDataModule(n_samples=N, dim=DIM, noise_std=NOISE, batch_size=128)
    cb = ConvergenceEarlyStopping(rules=["noise_dominated"], check_every_n_steps=2, patience=3, eta=1.0)
    excess = ExcessLoss(dm)

    def dump(trainer, pl_module):
        return {"stopped": cb.stopped_step, "step": trainer.global_step, "excess": excess.excess,
                "reason": cb.stopping_reason.value}

    trainer = _trainer([cb, excess, DumpOnRanks(tmp_path, dump)], max_steps=600, devices=2,
                       strategy=ddp_fork_strategy())
    trainer.fit(LinearModel(dim=DIM, lr=0.05), dm)
    r0, r1 = load_rank_results(tmp_path, 2)
    assert r0["stopped"] == r1["stopped"] is not None and r0["step"] == r1["step"] < 600
    assert r0["reason"] == "noise_dominated"
    # With 256 examples per step the final iterates jitter at the SGD noise floor, so check the smoothed excess:
    # the mean over the 10 steps before the stop is within the statistical error of the ERM (x 5 for SGD noise).
    window = [r0["excess"][s] for s in range(r0["stopped"] - 10, r0["stopped"])]
    assert sum(window) / len(window) < 5 * EPS
    assert r0["excess"][0] > 100 * EPS  # it did have something to converge


def test_noise_rule_on_a_bare_trainer_uses_per_example_gradients() -> None:
    # One device, no accumulation (before: a RuntimeError). Per-example gradients of the module's training_step
    # on the check step's batch give tr(Sigma); the rule stops after convergence, as with accumulation.
    L.seed_everything(0)
    dm = SyntheticRegressionDataModule(n_samples=N, dim=DIM, noise_std=NOISE, batch_size=64)
    cb = ConvergenceEarlyStopping(rules=["noise_dominated"], check_every_n_steps=2, patience=3, eta=1.0)
    excess = ExcessLoss(dm)
    trainer = _trainer([cb, excess], max_steps=600)
    trainer.fit(LinearModel(dim=DIM, lr=0.05), dm)
    assert cb.stopping_reason is ConvergenceStopReason.NOISE_DOMINATED and trainer.global_step < 600
    # SGD on 64 examples jitters at its noise floor: the mean excess of the 10 steps before the stop is within the
    # ERM's statistical error (x 5 for that jitter), as in the two-rank test.
    window = [excess.excess[s] for s in range(cb.stopped_step - 10, cb.stopped_step)]
    assert sum(window) / len(window) < 5 * EPS
    assert excess.excess[0] > 100 * EPS


class _Scheduled(LinearModel):
    def __init__(self, total: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.total = total

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, 1.0 - (s - 100) / (self.total - 100))
                                                  if s > 100 else 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def test_future_lrs_come_from_a_copy_of_the_scheduler() -> None:
    model = _Scheduled(total=200, dim=DIM, lr=0.01)
    cb = ConvergenceEarlyStopping(rules=["loss_curve"], check_every_n_steps=5, min_delta=0.0)
    trainer = _trainer([cb], max_steps=50)
    trainer.fit(model, SyntheticRegressionDataModule(dim=DIM))
    opt = trainer.optimizers[0]
    state_before = {k: v.clone() for k, v in opt.state[model.linear.weight].items()}
    lrs = _simulate_scheduler(trainer, trainer.lr_scheduler_configs[0], opt, 50, 150)
    expected = [0.01 * (min(1.0, 1.0 - (s - 100) / 100) if s > 100 else 1.0) for s in range(50, 200)]
    assert lrs == pytest.approx(expected, rel=1e-12)
    # The real optimizer and scheduler are untouched.
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 50
    assert all(torch.equal(v, opt.state[model.linear.weight][k]) for k, v in state_before.items())


def test_loss_curve_rule_stops_and_reports_why() -> None:
    # Least squares with plain SGD: the training loss flattens at the noise floor well before 600 steps.
    L.seed_everything(0)
    dm = SyntheticRegressionDataModule(n_samples=N, dim=DIM, noise_std=NOISE, batch_size=64)
    logger = MemoryLogger()
    cb = ConvergenceEarlyStopping(rules=["loss_curve"], check_every_n_steps=10, patience=2, min_delta=1e-3,
                                     min_points=5)
    trainer = _trainer([cb], max_steps=600, logger=logger, log_every_n_steps=10)
    trainer.fit(_Scheduled(total=600, dim=DIM, lr=0.01), dm)
    assert cb.stopping_reason is ConvergenceStopReason.LOSS_CURVE and "Loss-curve fit" in cb.stopping_reason_message
    assert trainer.global_step == cb.stopped_step < 600
    assert cb.curve_rule.predicted_improvement < 1e-3
    assert len(cb.curve_rule.history) == cb.stopped_step // 10
    assert logger.values("convergence/stop/predicted_improvement")[-1] < 1e-3
    # State round trip: the history and stop reason survive.
    other = ConvergenceEarlyStopping(rules=["loss_curve"], check_every_n_steps=10, patience=2, min_delta=1e-3,
                                     min_points=5)
    other.load_state_dict(cb.state_dict())
    assert other.curve_rule.history == cb.curve_rule.history and other.stopping_reason is cb.stopping_reason
    assert other.stopped_step == cb.stopped_step
    with pytest.raises(RuntimeError, match="version"):
        other.load_state_dict({"version": 0})


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"rules": []}, "rules"), ({"rules": ["patience"]}, "rules"), ({"check_every_n_steps": 0}, "check_every_n_steps"),
     ({"patience": 0}, "patience"), ({"min_step": -1}, "min_step"), ({"eta": 0.0}, "eta"), ({"eta": -1}, "eta"),
     ({"dataset_size": 1}, "dataset_size"), ({"window": 1}, "window"), ({"confidence_z": -0.5}, "confidence_z"),
     ({"ema_beta": 1.0}, "ema_beta"), ({"min_delta": -0.1}, "min_delta"),
     ({"min_points": 2}, "min_points"), ({"future_lr": "cosine"}, "future_lr"),
     ({"annealing_decay": 1.0}, "annealing_decay")],
)
def test_refuses_nonsense_arguments(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"ConvergenceEarlyStopping: `{field}`"):
        ConvergenceEarlyStopping(**kwargs)


def test_resume_reproduces_the_stop(tmp_path) -> None:
    # One full batch per epoch and no accumulation: a checkpoint after 30 steps resumes exactly (with
    # accumulate_grad_batches > 1, Lightning 2.6.6 resumes an end-of-fit checkpoint at batch_idx 4 of a new epoch and
    # takes a 1-micro-batch step, which changes the trajectory itself). The loss history, the LR areas, the streak
    # and the check position come from the file.
    def run(max_steps: int, ckpt=None):
        L.seed_everything(0)
        dm = SyntheticRegressionDataModule(n_samples=N, dim=DIM, noise_std=NOISE, batch_size=N, shuffle=False)
        cb = ConvergenceEarlyStopping(rules=["loss_curve"], check_every_n_steps=2, patience=3, min_delta=1e-4,
                                      min_points=5)
        trainer = _trainer([cb], max_steps=max_steps)
        model = _Scheduled(total=400, dim=DIM, lr=0.02)
        trainer.fit(model, dm, ckpt_path=ckpt)
        return trainer, cb, model

    _, straight, straight_model = run(400)
    first_trainer, first, _ = run(30)
    assert first.stopped_step is None and len(first.curve_rule.history) == 15
    first_trainer.save_checkpoint(tmp_path / "mid.ckpt")
    _, resumed, resumed_model = run(400, tmp_path / "mid.ckpt")
    assert resumed.stopped_step == straight.stopped_step is not None and straight.stopped_step < 400
    assert resumed.stopping_reason is straight.stopping_reason is ConvergenceStopReason.LOSS_CURVE
    assert resumed.curve_rule.history == straight.curve_rule.history
    assert torch.equal(resumed_model.linear.weight, straight_model.linear.weight)


def test_noise_rule_state_survives_a_round_trip() -> None:
    dm = SyntheticRegressionDataModule(n_samples=N, dim=DIM, noise_std=NOISE, batch_size=256)
    cb = ConvergenceEarlyStopping(rules=["noise_dominated"], check_every_n_steps=2)
    _trainer([cb], max_steps=20, accumulate_grad_batches=4).fit(LinearModel(dim=DIM, lr=0.05), dm)
    state = cb.state_dict()
    other = ConvergenceEarlyStopping(rules=["noise_dominated"], check_every_n_steps=2)
    other.load_state_dict(state)  # before fit: kept until the dataset size is known at train start
    assert other.state_dict()["noise_rule"] == state["noise_rule"]
    assert other.monitor.tracker.state_dict() == cb.monitor.tracker.state_dict()
    # One more step (measured: step 0 is a check step) on top of the loaded counters.
    _trainer([other], max_steps=1, accumulate_grad_batches=4).fit(LinearModel(dim=DIM), dm)
    assert other.noise_rule.checks == cb.noise_rule.checks + 1 and cb.noise_rule.checks == 10


class _Manual(LinearModel):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        loss = self.loss(self(batch[0]), batch[1])
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()


def test_runtime_errors_name_the_setting() -> None:
    dm = SyntheticRegressionDataModule(dim=DIM)
    with pytest.raises(RuntimeError, match="automatic optimization"):
        _trainer([ConvergenceEarlyStopping(rules=["loss_curve"])], max_steps=2).fit(_Manual(dim=DIM), dm)
    unbounded = L.Trainer(max_steps=-1, max_epochs=-1, accelerator="cpu", logger=False, enable_progress_bar=False,
                          enable_model_summary=False, enable_checkpointing=False,
                          callbacks=[ConvergenceEarlyStopping(rules=["loss_curve"])])
    with pytest.raises(RuntimeError, match="max_steps"):
        unbounded.fit(LinearModel(dim=DIM), dm)


def test_unsized_dataset_needs_dataset_size() -> None:
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            g = torch.Generator().manual_seed(0)
            for _ in range(64):
                yield torch.randn(DIM, generator=g), torch.randn((), generator=g)

    loader = torch.utils.data.DataLoader(Stream(), batch_size=8)
    with pytest.raises(RuntimeError, match="`dataset_size`"):
        _trainer([ConvergenceEarlyStopping()], max_steps=4, accumulate_grad_batches=2).fit(LinearModel(dim=DIM), loader)
    cb = ConvergenceEarlyStopping(dataset_size=64)
    _trainer([cb], max_steps=4, accumulate_grad_batches=2).fit(LinearModel(dim=DIM), loader)
    assert cb.noise_rule.dataset_size == 64


def test_future_lrs_of_a_budget_schedule_that_steps_itself() -> None:
    # LinearDecay advances on the optimizer's step hook; right after a step the rate is already step 1's, and the
    # simulation must continue 0.8, 0.7, ... (1 - s/10), not repeat 0.9.
    from lightning_convergence.optim import LinearDecay

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = LinearDecay(opt, total_steps=10)
    opt.step()
    assert forecast_lrs(sched, opt, 1, 4) == pytest.approx([0.9, 0.8, 0.7, 0.6], abs=1e-12)  # the core, no Trainer
