"""Budget-aware schedules: closed forms at chosen steps, warm-up, reductions (UBA phi=2 == cosine), errors."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_convergence.optim import CosineDecay, LinearDecay, REXDecay, UBADecay, WSDSchedule
from tests.helpers.schedules import lr_sequence


def _opt(lr: float = 2.0) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def _lrs(sched_cls, steps: int, lr: float = 2.0, **kw) -> list[float]:
    opt = _opt(lr)
    return lr_sequence(sched_cls(opt, **kw), opt, steps)


def test_schedules_linear_closed_form():
    lrs = _lrs(LinearDecay, 10, total_steps=10)
    assert lrs == pytest.approx([2.0 * (1 - t / 10) for t in range(10)], rel=0, abs=1e-12)


def test_schedules_linear_warmup_and_min_ratio():
    lrs = _lrs(LinearDecay, 12, total_steps=10, warmup_steps=3, min_lr_ratio=0.1)
    # warm-up (s+1)/(W+1) for s < W; then r + (1-r)(1 - (s-W)/(T-W)); past T the floor r.
    expected = [2.0 * (s + 1) / 4 for s in range(3)]
    expected += [2.0 * (0.1 + 0.9 * (1 - (s - 3) / 7)) for s in range(3, 10)]
    expected += [2.0 * 0.1, 2.0 * 0.1]
    assert lrs == pytest.approx(expected, rel=0, abs=1e-12)


def test_schedules_cosine_matches_torch_closed_form():
    # torch's CosineAnnealingLR closed form: eta_min + (eta_max - eta_min)(1 + cos(pi t / T_max)) / 2.
    ours = _lrs(CosineDecay, 20, total_steps=20, min_lr_ratio=0.05)
    ref = [0.1 + (2.0 - 0.1) * (1 + math.cos(math.pi * t / 20)) / 2 for t in range(20)]
    assert ours == pytest.approx(ref, rel=0, abs=1e-12)


def test_schedules_uba_phi2_is_cosine_exactly():
    uba = _lrs(UBADecay, 25, total_steps=25, warmup_steps=4, phi=2.0)
    cos = _lrs(CosineDecay, 25, total_steps=25, warmup_steps=4)
    assert uba == pytest.approx(cos, rel=1e-15, abs=1e-15)  # identical formula up to float rounding


@pytest.mark.parametrize(
    ("phi", "table"),
    [(0.5, [1, 0.959, 0.800, 0.407, 0.091]), (1.0, [1, 0.921, 0.667, 0.255, 0.048]),
     (4.0, [1, 0.745, 0.333, 0.079, 0.012])],
)
def test_schedules_uba_matches_reference_table(phi, table):
    # Values from ALGORITHMS.md section 3 (3 decimals) at t/T = 0, .25, .5, .75, .9.
    lrs = _lrs(UBADecay, 100, lr=1.0, total_steps=100, phi=phi)
    got = [lrs[t] for t in (0, 25, 50, 75, 90)]
    assert got == pytest.approx(table, abs=6e-4)  # the table is rounded to 3 decimals


def test_schedules_rex_closed_form():
    lrs = _lrs(REXDecay, 8, lr=1.0, total_steps=8)
    for t in (0, 2, 4, 7):
        z = t / 8
        assert lrs[t] == pytest.approx((1 - z) / (1 - z / 2), abs=1e-12)
    assert lrs[4] == pytest.approx(0.5 / 0.75, abs=1e-12)  # hand value at z = 1/2: 2/3


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
def test_schedules_wsd_phases(shape):
    # T=22, W=2: 20 post-warm-up steps, decay over the last 25% = 5 steps starting at step 2 + 15 = 17.
    lrs = _lrs(WSDSchedule, 22, lr=1.0, total_steps=22, warmup_steps=2, decay_fraction=0.25, decay_shape=shape)
    assert lrs[:2] == pytest.approx([1 / 3, 2 / 3])
    assert lrs[2:18] == [1.0] * 16  # stable phase (u = 0 at step 17 gives exactly 1 too)
    u = {18: 0.2, 20: 0.6, 21: 0.8}
    f = {"linear": lambda x: 1 - x, "cosine": lambda x: (1 + math.cos(math.pi * x)) / 2,
         "1-sqrt": lambda x: 1 - math.sqrt(x)}[shape]
    for s, x in u.items():
        assert lrs[s] == pytest.approx(f(x), abs=1e-9)


def test_schedules_wsd_full_linear_is_linear_decay():
    assert _lrs(WSDSchedule, 15, total_steps=15, decay_fraction=1.0, decay_shape="linear") == pytest.approx(
        _lrs(LinearDecay, 15, total_steps=15), abs=1e-12)


def test_schedules_state_dict_resume_continues_sequence():
    full = _lrs(REXDecay, 30, total_steps=30, warmup_steps=5)
    opt = _opt()
    sched = REXDecay(opt, total_steps=30, warmup_steps=5)
    for _ in range(13):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2 = _opt()
    sched2 = REXDecay(opt2, total_steps=30, warmup_steps=5)
    sched2.load_state_dict(state)
    opt2.param_groups[0]["lr"] = sched2.get_last_lr()[0]  # what Lightning's optimizer-state restore does
    rest = []
    for _ in range(17):
        rest.append(opt2.param_groups[0]["lr"])
        opt2.step()
        sched2.step()
    assert rest == full[13:]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"total_steps": 0}, "total_steps"), ({"total_steps": 10, "warmup_steps": 10}, "warmup_steps"),
     ({"total_steps": 10, "min_lr_ratio": 1.5}, "min_lr_ratio")],
)
def test_schedules_errors_name_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        LinearDecay(_opt(), **kwargs)


def test_schedules_subclass_errors():
    with pytest.raises(ValueError, match="phi"):
        UBADecay(_opt(), total_steps=10, phi=0.0)
    with pytest.raises(ValueError, match="decay_fraction"):
        WSDSchedule(_opt(), total_steps=10, decay_fraction=0.0)
    with pytest.raises(ValueError, match="decay_shape"):
        WSDSchedule(_opt(), total_steps=10, decay_shape="exp")
    sched = LinearDecay(_opt(), total_steps=10)
    with pytest.raises(RuntimeError, match="version"):
        sched.load_state_dict({**sched.state_dict(), "version": 99})


# -- the Lightning way (issue #15 item 3) --------------------------------------------------------------------------
def _lightning_lrs(make_sched, max_steps: int, callbacks=(), bare: bool = True):
    """Fit a tiny regression with ``configure_optimizers`` returning ``[opt], [sched]`` (bare) or the step dict;
    return the LR seen by each optimizer step."""
    from lightning.pytorch import LightningModule, Trainer
    from torch.utils.data import DataLoader, TensorDataset

    seen: list[float] = []

    class Tiny(LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            seen.append(self.trainer.optimizers[0].param_groups[0]["lr"])
            x, y = batch
            return torch.nn.functional.mse_loss(self.w(x), y)

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=2.0)
            sched = make_sched(opt)
            return ([opt], [sched]) if bare else {"optimizer": opt, "lr_scheduler": {"scheduler": sched,
                                                                                      "interval": "step"}}

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 2, generator=g), torch.randn(64, 1, generator=g))
    trainer = Trainer(max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=list(callbacks), accelerator="cpu", devices=1)
    trainer.fit(Tiny(), DataLoader(data, batch_size=4))  # 16 steps per epoch
    return seen


@pytest.mark.parametrize("bare", [True, False])
def test_schedules_step_per_optimizer_step_however_returned(bare):
    # Before: returned bare, Lightning stepped the schedule once per 16-step epoch (the LR stayed at 2.0).
    lrs = _lightning_lrs(lambda opt: LinearDecay(opt, total_steps=20), 20, bare=bare)
    assert lrs == pytest.approx([2.0 * (1 - t / 20) for t in range(20)], rel=0, abs=1e-12)


def test_schedules_total_steps_none_takes_the_trainer_budget():
    from lightning_convergence.callbacks import BudgetScheduleSync

    lrs = _lightning_lrs(lambda opt: WSDSchedule(opt, warmup_steps=2, decay_fraction=0.5, decay_shape="linear"), 12,
                         callbacks=[BudgetScheduleSync()])
    ref = _lrs(WSDSchedule, 12, total_steps=12, warmup_steps=2, decay_fraction=0.5, decay_shape="linear")
    assert lrs == pytest.approx(ref, rel=0, abs=1e-12)


def test_schedules_total_steps_none_without_a_budget_says_what_to_pass():
    opt = _opt()
    sched = LinearDecay(opt)  # the warm-up-free peak needs no budget
    assert opt.param_groups[0]["lr"] == 2.0
    with pytest.raises(RuntimeError, match="BudgetScheduleSync"):
        opt.step()
    assert sched.total_steps is None


@pytest.mark.parametrize("total", [400, 10])
def test_schedules_budget_mismatch_warns_once(total):
    from lightning_convergence.callbacks import BudgetScheduleSync

    with pytest.warns(UserWarning, match=f"`total_steps`={total} but the trainer will take 20") as record:
        _lightning_lrs(lambda opt: LinearDecay(opt, total_steps=total), 20, callbacks=[BudgetScheduleSync()])
    assert sum("`total_steps`=" in str(w.message) for w in record) == 1
