"""ScheduleRefinement in a Trainer: recorded norms, the two-run method, online mode, plots, and exact resume."""

from __future__ import annotations

import glob
import json
import warnings

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_convergence.callbacks import ScheduleRefinement
from lightning_convergence.optim import (
    LinearDecay,
    RefinedSchedule,
    REXDecay,
    UBADecay,
    WSDSchedule,
)
from tests.helpers.loggers import MemoryLogger

STEPS_PER_EPOCH = 8
NORMS = [1.0, 1.5, 0.8, 0.6, 0.9, 0.7, 0.5, 0.55, 0.4, 0.45, 0.5, 0.6]


class _Regression(LightningModule):
    """Noisy least squares on fixed data (32 samples, batch 4, no shuffle: 8 steps per epoch)."""

    def __init__(self, sched: str = "linear", total: int = 16, adam: bool = False, lr: float = 0.1) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.sched, self.total, self.adam, self.lr = sched, total, adam, lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def train_dataloader(self):
        gen = torch.Generator().manual_seed(123)
        x = torch.randn(32, 4, generator=gen)
        y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.3 * torch.randn(32, 1, generator=gen)
        return DataLoader(TensorDataset(x, y), batch_size=4, shuffle=False)

    def configure_optimizers(self):
        params = self.parameters()
        opt = torch.optim.Adam(params, lr=self.lr) if self.adam else torch.optim.SGD(params, lr=self.lr)
        if self.sched == "none":
            return opt
        kinds = {
            "linear": lambda: LinearDecay(opt, total_steps=self.total, warmup_steps=2),
            "rex": lambda: REXDecay(opt, total_steps=self.total, warmup_steps=2),
            "uba": lambda: UBADecay(opt, total_steps=self.total, phi=0.5),
            "wsd": lambda: WSDSchedule(opt, total_steps=self.total, warmup_steps=2, decay_fraction=0.5),
            "refined": lambda: RefinedSchedule(opt, norms=NORMS, norm_type="l2", total_steps=self.total,
                                               smoothing_tau=0.2),
        }
        return {"optimizer": opt, "lr_scheduler": {"scheduler": kinds[self.sched](), "interval": "step"}}


class _Recorder(Callback):
    """Records the rate each optimizer step uses (placed after ScheduleRefinement, which may set it)."""

    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.grad_l2: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append(optimizer.param_groups[0]["lr"])
        g = torch.cat([p.grad.reshape(-1) for p in pl_module.parameters()])
        self.grad_l2.append(float(torch.linalg.vector_norm(g)))


def _trainer(tmp_path, callbacks, max_steps=16, logger=False, **kw):
    return Trainer(
        max_steps=max_steps, accelerator="cpu", logger=logger, callbacks=callbacks, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        default_root_dir=str(tmp_path), log_every_n_steps=1, num_sanity_val_steps=0, **kw,
    )


@pytest.mark.parametrize("kind", ["linear", "rex", "uba", "wsd", "refined", "online"])
def test_schedule_refinement_resume_continues_identical_lr_sequence(tmp_path, kind):
    def make():
        seed_everything(0)
        model = _Regression(sched="linear" if kind == "online" else kind)
        ref = ScheduleRefinement(online=kind == "online", refit_every_n_steps=4, log_plot=False,
                                 norms_path=str(tmp_path / f"{kind}.json"))
        return model, ref, _Recorder()

    model, ref, rec = make()
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=STEPS_PER_EPOCH, save_top_k=-1)
    _trainer(tmp_path, [ref, rec, ckpt]).fit(model)
    path = glob.glob(str(tmp_path / "ckpt" / f"*step={STEPS_PER_EPOCH}*.ckpt"))[0]

    model2, ref2, rec2 = make()
    _trainer(tmp_path, [ref2, rec2]).fit(model2, ckpt_path=path)
    assert len(rec.lrs) == 16 and rec2.lrs == rec.lrs[STEPS_PER_EPOCH:]  # exact: closed forms of the step count
    assert ref2.norms == ref.norms
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    if kind == "online":
        assert ref2.profile == ref.profile and ref.profile is not None


def test_schedule_refinement_records_l2_for_sgd_and_writes_file(tmp_path):
    seed_everything(0)
    rec = _Recorder()
    ref = ScheduleRefinement(log_plot=False)
    _trainer(tmp_path, [ref, rec], max_steps=12).fit(_Regression(total=12))
    assert ref.resolved_norm_type == "l2"
    assert ref.norms == pytest.approx(rec.grad_l2, rel=1e-6)  # fused float32 norm vs torch.linalg
    saved = json.loads((tmp_path / "refinement_norms.json").read_text())
    assert saved["norm_type"] == "l2" and saved["norms"] == ref.norms and saved["global_step"] == 12


def test_schedule_refinement_auto_picks_l1_for_adam(tmp_path):
    seed_everything(0)
    ref = ScheduleRefinement(log_plot=False, norms_path=str(tmp_path / "n.pt"))
    _trainer(tmp_path, [ref], max_steps=4).fit(_Regression(sched="none", adam=True))
    assert ref.resolved_norm_type == "l1"
    assert torch.load(tmp_path / "n.pt", weights_only=True)["norm_type"] == "l1"


def test_schedule_refinement_two_run_applies_refined_schedule(tmp_path):
    seed_everything(0)
    ref = ScheduleRefinement(log_plot=False, norms_path=str(tmp_path / "run1.json"))
    _trainer(tmp_path, [ref], max_steps=16).fit(_Regression(total=16))
    # Run 2: a different budget (24 steps) driven by the file through RefinedSchedule.
    seed_everything(0)
    model = _Regression(sched="none", total=24)
    rec = _Recorder()

    def configure():
        opt = torch.optim.SGD(model.parameters(), lr=0.2)
        sched = RefinedSchedule(opt, norms=str(tmp_path / "run1.json"), total_steps=24)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    model.configure_optimizers = configure
    _trainer(tmp_path, [rec], max_steps=24).fit(model)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.2)
    expected = RefinedSchedule(opt, norms=ref.norms, norm_type="l2", total_steps=24)
    assert rec.lrs == pytest.approx([0.2 * expected.factor(s) for s in range(24)], rel=1e-12)
    assert 0.15 < max(rec.lrs) <= 0.2 and rec.lrs[-1] < 0.2 * 0.1  # the grid need not hit the exact peak


def test_schedule_refinement_online_never_above_peak_and_monotone(tmp_path):
    seed_everything(0)
    rec = _Recorder()
    ref = ScheduleRefinement(online=True, refit_every_n_steps=4, log_plot=False)
    logger = MemoryLogger()
    _trainer(tmp_path, [ref, rec], max_steps=24, logger=logger).fit(_Regression(total=24))
    base = LinearDecay(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), total_steps=24,
                       warmup_steps=2)
    assert rec.lrs[:4] == pytest.approx([0.1 * base.factor(s) for s in range(4)])  # the scheduler before refit
    after = rec.lrs[4:]
    assert all(lr <= 0.1 + 1e-15 for lr in rec.lrs)
    assert all(b <= a for a, b in zip(after, after[1:]))
    # The applied rate is peak * min over refits of the fitted profile at that step.
    assert rec.lrs[-1] == pytest.approx(0.1 * ref.scale)
    assert logger.values("convergence/schedule/lr") == pytest.approx(rec.lrs)
    assert len(logger.values("convergence/schedule/grad_norm")) == 24


def test_schedule_refinement_plot_logged_or_warned(tmp_path):
    class ImageLogger(MemoryLogger):
        def __init__(self):
            super().__init__()
            self.images = []

        def log_image(self, key, images, step=None, **kwargs):
            self.images.append((key, images, step))

    seed_everything(0)
    img, plain = ImageLogger(), MemoryLogger()
    ref = ScheduleRefinement(norms_path=str(tmp_path / "p" / "norms.json"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(tmp_path, [ref], max_steps=8, logger=[img, plain]).fit(_Regression(total=8))
    assert img.images and img.images[0][0] == "convergence/schedule/refined_schedule"
    assert (tmp_path / "p" / "norms.png").is_file()
    msgs = [str(w.message) for w in caught if "log_image" in str(w.message)]
    assert len(msgs) == 1 and "MemoryLogger" in msgs[0]


def test_schedule_refinement_errors():
    with pytest.raises(ValueError, match="norm_type"):
        ScheduleRefinement(norm_type="l3")
    with pytest.raises(ValueError, match="refit_every_n_steps"):
        ScheduleRefinement(refit_every_n_steps=1)
    with pytest.raises(ValueError, match="smoothing_tau"):
        ScheduleRefinement(smoothing_tau=-0.1)
    with pytest.raises(RuntimeError, match="version"):
        ScheduleRefinement().load_state_dict({"version": 0})


def test_schedule_refinement_online_needs_finite_budget(tmp_path):
    trainer = Trainer(max_epochs=-1, max_steps=-1, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
                      callbacks=[ScheduleRefinement(online=True)])
    with pytest.raises(ValueError, match="max_steps"):
        trainer.fit(_Regression(sched="none"))


def _rank_view(trainer, pl_module):
    ref = next(c for c in trainer.callbacks if isinstance(c, ScheduleRefinement))
    rec = next(c for c in trainer.callbacks if isinstance(c, _Recorder))
    return {"norms": ref.norms, "lrs": rec.lrs, "grad_l2": rec.grad_l2, "profile": ref.profile}


def test_schedule_refinement_two_ranks_record_global_norms_and_agree(tmp_path):
    from tests.helpers.dist import DumpOnRanks, ddp_fork_strategy, load_rank_results

    seed_everything(0)
    ref = ScheduleRefinement(online=True, refit_every_n_steps=4, log_plot=False,
                             norms_path=str(tmp_path / "ddp_norms.json"))
    trainer = _trainer(tmp_path, [ref, _Recorder(), DumpOnRanks(tmp_path / "dump", _rank_view)], max_steps=8,
                       devices=2, strategy=ddp_fork_strategy())
    trainer.fit(_Regression(total=8))
    r0, r1 = load_rank_results(tmp_path / "dump", 2)
    assert r0["grad_l2"] != [] and r0["grad_l2"] == r1["grad_l2"]  # the all-reduced (global) gradient
    assert r0["norms"] == r1["norms"] and r0["norms"] == pytest.approx(r0["grad_l2"], rel=1e-6)
    assert r0["lrs"] == r1["lrs"] and r0["profile"] is not None and r0["profile"] == r1["profile"]
    assert json.loads((tmp_path / "ddp_norms.json").read_text())["norms"] == r0["norms"]


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_schedule_refinement_nonfinite_policy(tmp_path, policy, caplog):
    class PoisonAtStep2(Callback):
        """Step 2's gradient is NaN when ScheduleRefinement reads it; records whether a stale norm stayed visible."""

        def __init__(self) -> None:
            self.visible_at_2 = None

        def on_after_backward(self, trainer, pl_module):
            if trainer.global_step == 2:
                pl_module.layer.weight.grad[0, 0] = float("nan")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:  # the optimizer step taken at global_step 2 is done
                self.visible_at_2 = "convergence/schedule/grad_norm" in trainer.callback_metrics

    seed_everything(0)
    logger = MemoryLogger()
    ref = ScheduleRefinement(norm_type="l1", log_plot=False, on_nonfinite=policy)
    poison = PoisonAtStep2()
    trainer = _trainer(tmp_path, [ref, poison], max_steps=6, logger=logger)
    trainer.fit(_Regression(total=6))
    assert ref.resolved_norm_type == "l1"  # explicit choice wins over auto (SGD would give l2)
    assert all(n == n and n > 0 for n in ref.norms)  # no NaN recorded
    assert poison.visible_at_2 is False  # the step-1 norm is not left in callback_metrics for step 2
    assert "ScheduleRefinement: non-finite gradients at optimizer step 2" in caplog.text
    if policy == "stop":  # the poisoned step is not applied and training ends at that step boundary
        assert trainer.global_step == 3 and len(ref.norms) == 2 and ref.nonfinite_skipped_total == 1
        return
    assert len(ref.norms) == 5 and ref.nonfinite_skipped_total == 1
    assert logger.values("convergence/schedule/nonfinite_skipped_total") == [0, 0, 1, 1, 1, 1]
