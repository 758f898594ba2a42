"""GradientEarlyStopping (GradES) in real Trainers: freeze order, exact freezing (also under 2-rank DDP with momentum
optimizers), stop decision, checkpointed frozen set, logging and argument errors."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy

from lightning_convergence.callbacks.gradient_early_stopping import GradientEarlyStopping
from tests.helpers.dist import DumpOnRanks, fork_strategy_kwargs, load_rank_results
from tests.helpers.loggers import MemoryLogger
from tests.stopping.early_stopping_models import Blocks, ParamTrace


def _trainer(callbacks, max_steps=300, **kwargs) -> L.Trainer:
    kwargs.setdefault("logger", False)
    return L.Trainer(
        max_steps=max_steps, accelerator="cpu", enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks, **kwargs,
    )


def _assert_frozen_unchanged(trace: dict, final: dict, frozen: dict[str, int]) -> None:
    """A matrix frozen at step t keeps, at every later step and at the end, its value from before step t."""
    for name, t in frozen.items():
        ref = trace[t][name] if t in trace else final[name]  # frozen after the last step: its final value
        for s in sorted(trace):
            if s > t:
                assert torch.equal(trace[s][name], ref), f"{name} frozen at {t} changed by step {s}"
        assert torch.equal(final[name], ref), f"{name} changed after freezing at {t}"


@pytest.mark.parametrize("measure_at", ["after_step", "before_step"])
@pytest.mark.parametrize("signal", ["grad", "weight_change"])
def test_freezes_in_convergence_order_and_stops(signal: str, measure_at: str) -> None:
    # Blocks with curvature 4, 1, 0.25 under full-batch GD: the gradient (and the step) of `fast` shrinks fastest.
    cb = GradientEarlyStopping(tau=1e-3 if signal == "grad" else 1e-4, grace_fraction=0.1, signal=signal,
                               reduction="mean", measure_at=measure_at)
    trace = ParamTrace()
    trainer = _trainer([cb, trace], max_steps=600)
    trainer.fit(Blocks())
    frozen = cb.core.frozen
    assert list(frozen) == ["fast.weight", "mid.weight", "slow.weight"]
    assert frozen["fast.weight"] < frozen["mid.weight"] < frozen["slow.weight"]
    assert frozen["fast.weight"] >= cb.core.grace_steps == 60  # nothing before floor(0.1 * 600)
    # All frozen -> stop at that very check: after the step it measured (after_step), or after one more, update-free
    # step (before_step: the check ran before the step it belongs to).
    extra = 1 if measure_at == "before_step" else 0
    assert cb.stopped_step == frozen["slow.weight"] and trainer.global_step == cb.stopped_step + extra < 600
    _assert_frozen_unchanged(trace.trace, trace.final, frozen)
    assert not any(p.requires_grad for p in trainer.lightning_module.parameters())


def test_grace_fraction_blocks_early_freezing() -> None:
    # With alpha = 0.5 nothing may freeze before step 150, although `fast` is below tau long before.
    cb = GradientEarlyStopping(tau=1e-3, grace_fraction=0.5, signal="grad", reduction="mean")
    _trainer([cb], max_steps=300).fit(Blocks())
    assert min(cb.core.frozen.values()) == 150


def test_max_frozen_ratio_and_logging() -> None:
    logger = MemoryLogger()
    cb = GradientEarlyStopping(tau=1e-3, grace_fraction=0.0, signal="grad", reduction="mean",
                               max_frozen_ratio=0.5, log_per_item=True)
    trainer = _trainer([cb], max_steps=600, logger=logger, log_every_n_steps=1)
    trainer.fit(Blocks())
    # 2 of 3 frozen (>= 0.5) stops; the slow block stays trainable.
    assert set(cb.core.frozen) == {"fast.weight", "mid.weight"} and cb.stopped_step == cb.core.frozen["mid.weight"]
    fractions = logger.values("convergence/stop/frozen_fraction")
    assert fractions[0] == 0.0 and fractions[-1] == pytest.approx(2 / 3)
    assert logger.values("convergence/stop/frozen_total")[-1] == 2
    assert logger.values("convergence/stop/frozen_numel_total")[-1] == 8
    assert len(logger.values("convergence/stop/signal/slow.weight")) > 0


@pytest.mark.parametrize(("measure_at", "first"), [("after_step", 2), ("before_step", 1)])
def test_first_weight_change_check_never_freezes(measure_at: str, first: int) -> None:
    # The official code's first check returns 0.0, which with alpha = 0 would freeze everything at once. Here the
    # first check (after step 1, or before it) only caches the weights; the next one (step 2, or 1) may freeze.
    cb = GradientEarlyStopping(tau=1e9, grace_fraction=0.0, signal="weight_change", stop_training=False,
                               measure_at=measure_at)
    _trainer([cb], max_steps=3).fit(Blocks())
    assert set(cb.core.frozen.values()) == {first}


def test_drop_grad_mode_keeps_requires_grad_but_no_update() -> None:
    cb = GradientEarlyStopping(tau=1e-3, grace_fraction=0.1, signal="grad", reduction="mean",
                               freeze_mode="drop_grad", stop_training=False)
    trace = ParamTrace()
    _trainer([cb, trace], max_steps=200).fit(Blocks(momentum=0.9, lr=0.02, weight_decay=1e-3))
    assert "fast.weight" in cb.core.frozen
    assert all(p.requires_grad for p in cb._params.values())
    _assert_frozen_unchanged(trace.trace, trace.final, cb.core.frozen)


def _dump(trainer, pl_module):
    cb = next(c for c in trainer.callbacks if isinstance(c, GradientEarlyStopping))
    trace = next(c for c in trainer.callbacks if isinstance(c, ParamTrace))
    return {"frozen": dict(cb.core.frozen), "mode": cb.resolved_mode, "trace": trace.trace, "final": trace.final}


@pytest.mark.parametrize(
    ("optimizer", "find_unused"),
    [("sgd", False), ("adamw", True)],
    ids=["sgd_momentum_wd-drop_grad", "adamw-requires_grad"],
)
def test_ddp_two_ranks_frozen_params_never_change(tmp_path, optimizer: str, find_unused: bool) -> None:
    # SGD: momentum 0.9 + weight decay; AdamW: decoupled weight decay 0.1. Either would move a frozen matrix if its
    # gradient (or a zero gradient) reached the optimizer. Each rank sees its half of the data.
    model = Blocks(optimizer=optimizer, lr=0.02 if optimizer == "sgd" else 0.05, momentum=0.9, weight_decay=1e-3
                   if optimizer == "sgd" else 0.1, batch_size=64)
    # tau sits a factor >= 1.4 away from every block's plateau (measured: with weight decay the `fast` block settles
    # at a gradient of 3.5e-3 (SGD) / 1e-1 (AdamW), the others at <= 1e-3 / 5e-3), so one block stays live.
    tau = 2e-3 if optimizer == "sgd" else 7e-3
    cb = GradientEarlyStopping(tau=tau, grace_fraction=0.1, signal="grad", reduction="mean", stop_training=False)
    strategy = DDPStrategy(find_unused_parameters=find_unused, **fork_strategy_kwargs())
    trainer = _trainer([cb, ParamTrace(), DumpOnRanks(tmp_path, _dump)], max_steps=120, devices=2,
                       strategy=strategy, use_distributed_sampler=True)
    trainer.fit(model)
    r0, r1 = load_rank_results(tmp_path, 2)
    assert r0["mode"] == r1["mode"] == ("requires_grad" if find_unused else "drop_grad")
    assert r0["frozen"] == r1["frozen"] and len(r0["frozen"]) >= 1
    for r in (r0, r1):
        _assert_frozen_unchanged(r["trace"], r["final"], r["frozen"])
    for name in r0["final"]:
        assert torch.equal(r0["final"][name], r1["final"][name])
    # The still-trainable matrices did keep training after the freeze.
    live = [n for n in r0["final"] if n not in r0["frozen"]]
    assert live and all(not torch.equal(r0["final"][n], r0["trace"][20][n]) for n in live)


def test_requires_grad_mode_under_plain_ddp_is_refused(tmp_path) -> None:
    cb = GradientEarlyStopping(tau=1e-3, freeze_mode="requires_grad")
    trainer = _trainer([cb], max_steps=2, devices=2, strategy=DDPStrategy(**fork_strategy_kwargs()))
    with pytest.raises(Exception, match="find_unused_parameters"):
        trainer.fit(Blocks(batch_size=64))


def test_resume_keeps_frozen_set(tmp_path) -> None:
    kwargs = dict(tau=1e-3, grace_fraction=0.0, signal="grad", reduction="mean", total_steps=400)
    # Straight run of 120 steps.
    straight = GradientEarlyStopping(**kwargs)
    t = _trainer([straight], max_steps=120)
    t.fit(Blocks())
    ref = {k: v.detach().clone() for k, v in t.lightning_module.named_parameters()}
    # 60 steps, checkpoint, fresh Trainer/model/callback resumes to 120.
    first = GradientEarlyStopping(**kwargs)
    t1 = _trainer([first], max_steps=60)
    t1.fit(Blocks())
    assert "fast.weight" in first.core.frozen  # the resume must carry a non-empty frozen set
    ckpt = tmp_path / "mid.ckpt"
    t1.save_checkpoint(ckpt)
    second = GradientEarlyStopping(**kwargs)
    model = Blocks()
    t2 = _trainer([second], max_steps=120)
    t2.fit(model, ckpt_path=ckpt)
    assert dict(second.core.frozen) == dict(straight.core.frozen)
    assert all(not model.get_parameter(n).requires_grad for n in first.core.frozen)
    for k, v in model.named_parameters():
        assert torch.equal(v.detach(), ref[k]), k


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"tau": 0.0}, "tau"), ({"tau": -1.0}, "tau"), ({"tau": float("nan")}, "tau"),
        ({"grace_fraction": 1.0}, "grace_fraction"), ({"grace_fraction": -0.1}, "grace_fraction"),
        ({"max_frozen_ratio": 0.0}, "max_frozen_ratio"), ({"max_frozen_ratio": 1.5}, "max_frozen_ratio"),
        ({"signal": "hessian"}, "signal"), ({"reduction": "max"}, "reduction"), ({"patience": 0}, "patience"),
        ({"check_every_n_steps": 0}, "check_every_n_steps"), ({"min_ndim": 0}, "min_ndim"),
        ({"total_steps": 0}, "total_steps"),
        ({"freeze_mode": "maybe"}, "freeze_mode"), ({"include": ["("]}, "include"),
    ],
)
def test_refuses_nonsense_arguments(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"GradientEarlyStopping: `{field}`"):
        GradientEarlyStopping(**kwargs)


def test_setup_errors_name_the_setting() -> None:
    with pytest.raises(RuntimeError, match="`include`"):
        _trainer([GradientEarlyStopping(include=["q_proj"])], max_steps=2).fit(Blocks())
    with pytest.raises(RuntimeError, match="max_steps"):
        L.Trainer(max_epochs=-1, max_steps=-1, accelerator="cpu", logger=False, enable_progress_bar=False,
                  enable_model_summary=False, enable_checkpointing=False,
                  callbacks=[GradientEarlyStopping()]).fit(Blocks())


def test_include_patterns_select_by_name() -> None:
    cb = GradientEarlyStopping(include=["fast", "slow"], exclude=["slow"], stop_training=False)
    _trainer([cb], max_steps=1).fit(Blocks())
    assert list(cb._params) == ["fast.weight"]


def test_manual_optimization_is_refused() -> None:
    class Manual(Blocks):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            loss = torch.nn.functional.mse_loss(self(batch[0]), batch[1])
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()

    with pytest.raises(RuntimeError, match="automatic optimization"):
        _trainer([GradientEarlyStopping()], max_steps=2).fit(Manual())
