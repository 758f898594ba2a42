"""Contract: every public callback and every registered strategy runs on every foreign module shape of the zoo.

A part either trains (a few optimizer steps, nothing non-finite logged) or, where it truly cannot run on that
shape, fails at setup with a project-level error that names the part and what to pass: never a deep torch or
Lightning traceback. The table below lists those expected errors explicitly, so a new failure is a test failure.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.strategies import StrategyRegistry

import lightning_convergence  # noqa: F401  (registers the strategy names)
import lightning_convergence.callbacks as public_callbacks
from lightning_convergence.callbacks import (
    AdaptiveBatchSize,
    BudgetScheduleSync,
    ConvergenceEarlyStopping,
    GradientEarlyStopping,
    GradientStatsMonitor,
    GradientVarianceSampling,
    ScheduleFreeModeSwitch,
    ScheduleRefinement,
)
from lightning_convergence.data import FederatedDataModule
from lightning_convergence.optim import LinearDecay
from tests.helpers.dist import DumpOnRanks, fork_strategy_kwargs, load_rank_results
from tests.helpers.loggers import MemoryLogger
from tests.zoo.models import ZOO, ZooEntry

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
]

STEPS = 6


def _trainer(tmp_path: Any, callbacks: list[Callback] | None = None, logger: Any = None, **kw: Any) -> Trainer:
    args: dict[str, Any] = {
        "max_steps": STEPS, "accelerator": "cpu", "devices": 1, "logger": logger if logger is not None else False,
        "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
        "limit_val_batches": 0, "log_every_n_steps": 1, "default_root_dir": tmp_path, "callbacks": callbacks or [],
    }
    args.update(kw)
    return Trainer(**args)


def _schedule_free(module: Any) -> Any:
    """The documented setup of ScheduleFreeModeSwitch: the module's optimizer is a schedule-free one."""
    schedulefree = pytest.importorskip("schedulefree")
    module.configure_optimizers = lambda: schedulefree.SGDScheduleFree(module.parameters(), lr=0.05)
    return module


def _budget_schedule(module: Any) -> Any:
    """The documented setup of BudgetScheduleSync: ``configure_optimizers`` returns a budget schedule, unsized."""
    def configure() -> Any:
        opt = torch.optim.SGD(module.parameters(), lr=0.05)
        return [opt], [LinearDecay(opt, total_steps=None)]

    module.configure_optimizers = configure
    return module


# name -> (defaults factory, documented-setup factory returning (callback, trainer kwargs, module transform))
CALLBACKS: dict[str, tuple[Callable[[], Callback], Callable[[], tuple[Callback, dict[str, Any], Any]]]] = {
    "AdaptiveBatchSize": (
        AdaptiveBatchSize,
        lambda: (AdaptiveBatchSize(test="norm", eta=0.5, max_batch_size=64), {"accumulate_grad_batches": 2}, None),
    ),
    "BudgetScheduleSync": (BudgetScheduleSync, lambda: (BudgetScheduleSync(), {}, _budget_schedule)),
    "ConvergenceEarlyStopping": (
        ConvergenceEarlyStopping,
        lambda: (ConvergenceEarlyStopping(check_every_n_steps=2), {"accumulate_grad_batches": 2}, None),
    ),
    "GradientEarlyStopping": (
        GradientEarlyStopping,
        lambda: (GradientEarlyStopping(tau=1e-3, grace_fraction=0.5, signal="grad"), {}, None),
    ),
    "GradientStatsMonitor": (
        GradientStatsMonitor,
        lambda: (GradientStatsMonitor(log_every_n_steps=2), {"accumulate_grad_batches": 2}, None),
    ),
    "GradientVarianceSampling": (
        GradientVarianceSampling,
        lambda: (GradientVarianceSampling(policy="neyman", check_every_n_steps=2, probe_per_group=2), {}, None),
    ),
    "ScheduleFreeModeSwitch": (ScheduleFreeModeSwitch, lambda: (ScheduleFreeModeSwitch(), {}, _schedule_free)),
    "ScheduleRefinement": (
        ScheduleRefinement,
        lambda: (ScheduleRefinement(online=True, refit_every_n_steps=2, log_plot=False), {}, None),
    ),
}

# Where a part truly cannot run with its defaults: (callback, shape) -> (exception type, words of the message).
EXPECTED_ERRORS: dict[tuple[str, str], tuple[type[Exception], str]] = {
    # A plain SGD optimizer has no train()/eval(): the switch says so (its documented setup passes).
    **{("ScheduleFreeModeSwitch", z.name): (TypeError, "ScheduleFreeModeSwitch") for z in ZOO},
    # Token data has one label per position, not per example: there are no groups to sample by.
    ("GradientVarianceSampling", "target_transformer"): (TypeError, "group_fn"),
    ("GradientVarianceSampling", "dict_output_transformer"): (TypeError, "group_fn"),
}


def _finite_logs(logger: MemoryLogger) -> None:
    for _, metrics in logger.history:
        for key, value in metrics.items():
            assert math.isfinite(value), f"{key} was logged as {value}"


def _run(tmp_path: Any, entry: ZooEntry, callback: Callback, trainer_kw: dict[str, Any],
         transform: Any = None) -> MemoryLogger:
    torch.manual_seed(0)
    logger = MemoryLogger()
    module = entry.module()
    if transform is not None:
        module = transform(module)
    trainer = _trainer(tmp_path, [callback], logger=logger, **trainer_kw)
    trainer.fit(module, entry.datamodule())
    assert trainer.global_step > 0
    _finite_logs(logger)
    return logger


def test_every_public_callback_is_in_the_zoo_contract():
    public = {n for n in public_callbacks.__all__ if isinstance(getattr(public_callbacks, n), type)
              and issubclass(getattr(public_callbacks, n), Callback)}
    assert set(CALLBACKS) == public


@pytest.mark.parametrize("entry", ZOO, ids=repr)
@pytest.mark.parametrize("name", sorted(CALLBACKS))
def test_callback_defaults_on_a_bare_trainer(tmp_path, name, entry):
    expected = EXPECTED_ERRORS.get((name, entry.name))
    callback = CALLBACKS[name][0]()
    if expected is None:
        _run(tmp_path, entry, callback, {})
    else:
        with pytest.raises(expected[0], match=expected[1]) as info:
            _run(tmp_path, entry, callback, {})
        assert str(info.value).startswith(name) or name in str(info.value)


@pytest.mark.parametrize("entry", ZOO, ids=repr)
@pytest.mark.parametrize("name", sorted(CALLBACKS))
def test_callback_documented_setup(tmp_path, name, entry):
    callback, trainer_kw, transform = CALLBACKS[name][1]()
    expected = EXPECTED_ERRORS.get((name, entry.name))
    if expected is not None and name != "ScheduleFreeModeSwitch":
        with pytest.raises(expected[0], match=expected[1]):
            _run(tmp_path, entry, callback, trainer_kw, transform)
        return
    _run(tmp_path, entry, callback, trainer_kw, transform)


def _strategy(name: str, world_size: int) -> Any:
    spec = StrategyRegistry[name]
    kwargs = dict(spec["init_params"])
    if name == "async_fl":
        return spec["strategy"](**{**kwargs, "num_clients": 2, "local_steps": 1})
    if "schedule" in kwargs:
        kwargs["schedule"] = 2  # a sync round within the short run
    if name == "streaming_diloco":  # the zoo's models have 2 layer blocks (the default splits into 4 fragments)
        kwargs.update(num_fragments=2, sync_every=4)
    if world_size > 1:
        kwargs.update(fork_strategy_kwargs())
    return spec["strategy"](**kwargs)


STRATEGIES = sorted(
    k for k, v in StrategyRegistry.items() if v["strategy"].__module__.startswith("lightning_convergence")
)


def _strategy_cases() -> list[Any]:
    """Every strategy on every shape on 1 rank; on 2 forked ranks every strategy once, on a rotating shape (so each
    shape meets two or three strategies), to keep the forked runs within the suite's time budget. ``async_fl`` has
    no world size of its own: it forks ``num_clients`` client processes (2 here) in its 1-rank cases."""
    cases = [pytest.param(n, 1, z, id=f"{n}-1-{z.name}") for n in STRATEGIES for z in ZOO]
    for i, n in enumerate(s for s in STRATEGIES if s != "async_fl"):
        z = ZOO[i % len(ZOO)]
        cases.append(pytest.param(n, 2, z, id=f"{n}-2-{z.name}"))
    return cases


def _documented_module(name: str, entry: ZooEntry) -> Any:
    """The zoo module, with the optimizer a strategy documents as required (DeMo and 1-bit Adam own their
    communication, so ``demo``/``onebit_adam`` refuse plain SGD at setup with a message that says so)."""
    module = entry.module()
    if name in ("demo", "onebit_adam"):
        from lightning_convergence.optim import DeMo, OnebitAdam

        make = {"demo": lambda: DeMo(module.parameters(), lr=1e-3, topk=4, chunk_size=8),
                "onebit_adam": lambda: OnebitAdam(module.parameters(), lr=1e-3, start_step=2)}[name]
        module.configure_optimizers = make
    return module


@pytest.mark.parametrize(("name", "world_size", "entry"), _strategy_cases())
def test_strategy_on_every_shape(tmp_path, name, world_size, entry):
    torch.manual_seed(0)
    data: Any = entry.datamodule()
    if name == "async_fl":
        data = FederatedDataModule(data, num_clients=2, server_steps_per_epoch=STEPS)
    dump = DumpOnRanks(tmp_path / "ranks", lambda trainer, module: trainer.global_step)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = _trainer(tmp_path, [dump], strategy=_strategy(name, world_size), devices=world_size, max_steps=4)
        trainer.fit(_documented_module(name, entry), data)
    assert load_rank_results(tmp_path / "ranks", world_size) == [4] * world_size


def _rank_view(trainer: Trainer, module: Any) -> dict[str, Any]:
    logged = [v for _, m in trainer.loggers[0].history for v in m.values()] if trainer.is_global_zero else []
    return {"step": trainer.global_step, "logged": logged, "params": [p.detach().clone() for p in module.parameters()]}


def _fit_two_ranks(tmp_path: Any, entry: ZooEntry, callbacks: list[Callback]) -> None:
    from lightning.pytorch.strategies import DDPStrategy

    torch.manual_seed(0)
    dump = DumpOnRanks(tmp_path / "ranks", _rank_view)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = _trainer(tmp_path, [*callbacks, dump], logger=MemoryLogger(), devices=2, max_steps=4,
                           strategy=DDPStrategy(**fork_strategy_kwargs()))
        module = entry.module()
        if any(isinstance(c, ScheduleFreeModeSwitch) for c in callbacks):
            module = _schedule_free(module)
        trainer.fit(module, entry.datamodule())
    r0, r1 = load_rank_results(tmp_path / "ranks", 2)
    assert r0["step"] == r1["step"] > 0  # both ranks end together (a stopping callback may end the run early)
    assert r0["logged"] and all(math.isfinite(v) for v in r0["logged"])
    for a, b in zip(r0["params"], r1["params"]):  # every callback acted alike on both ranks
        assert torch.equal(a, b)


TWO_RANK_BUNDLE = sorted(n for n in CALLBACKS if n != "GradientVarianceSampling")


@pytest.mark.parametrize("entry", ZOO, ids=repr)
def test_every_callback_on_two_ranks(tmp_path, entry):
    """The public callbacks together with their defaults on 2 forked DDP ranks, one process pair per shape (with the
    schedule-free optimizer the mode switch documents). GradientVarianceSampling runs in its own pair below: with
    AdaptiveBatchSize under DDP the two samplers do not compose yet (the xfail below)."""
    _fit_two_ranks(tmp_path, entry, [CALLBACKS[n][0]() for n in TWO_RANK_BUNDLE])


@pytest.mark.parametrize("entry", [z for z in ZOO if ("GradientVarianceSampling", z.name) not in EXPECTED_ERRORS][1:],
                         ids=repr)
def test_variance_sampling_on_two_ranks(tmp_path, entry):
    """Defaults on the foreign shapes that have groups (the tuple MLP at 2 ranks: tests/callbacks)."""
    _fit_two_ranks(tmp_path, entry, [GradientVarianceSampling()])


@pytest.mark.xfail(strict=True, raises=Exception, reason="GradientVarianceSampling + AdaptiveBatchSize under DDP: "
                   "Lightning re-creates the group sampler under the resizable batch sampler, so the weights of a "
                   "batch are asked of a sampler that did not draw it (works on one device)")
def test_variance_sampling_with_adaptive_batch_on_two_ranks(tmp_path):
    _fit_two_ranks(tmp_path, ZOO[0], [GradientVarianceSampling(), AdaptiveBatchSize()])
