"""The part registry of the contract suite (Composer's ``algorithm_settings.py`` pattern).

One :class:`Part` per public callback (``lightning_convergence.callbacks.__all__``) and per strategy name our package
registers in Lightning's ``StrategyRegistry``: the small settings that make the part act within the 4 optimizer steps
of the resume harness (:mod:`tests.helpers.resume`) at 1 and 2 ranks, the optimizer family it needs, the
``convergence/...`` keys it must log on such a run, and the Lightning-free core packages its adapter calls.
:func:`discovered_parts` lists what the package exposes; ``test_registry_covers_every_public_part`` fails when a part
is added without an entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lightning.pytorch.strategies import StrategyRegistry

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
from tests.helpers.resume import Case

__all__ = ["PARTS", "Part", "discovered_parts", "part_class"]

NOT_PARTS = {"ConvergenceStopReason"}  # public in callbacks.__all__, but an Enum of stop reasons, not a callback


@dataclass(frozen=True)
class Part:
    """One public part under contract.

    ``case`` builds fresh instances for every run; ``keys`` are the ``convergence/...`` keys a 4-step run at 2 ranks
    with accumulation 2 must log (finite); ``cores`` are the core packages (``lightning_convergence.<core>``) its
    adapter module imports; ``resume`` is ``"anywhere"`` (the every-step harness) or ``"own"`` (a part with its own
    process model, covered by its own resume test in ``test_resume_anywhere.py``).
    """

    name: str
    case: Case
    keys: tuple[str, ...] = ()
    cores: tuple[str, ...] = ()
    resume: str = "anywhere"
    variant_of: str | None = None  # a second setting of the part named here (another code path worth resuming)

    @property
    def base(self) -> str:
        return self.variant_of or self.name


def _callback(name: str, build: Callable[[int, int], list[Any]], keys: tuple[str, ...], cores: tuple[str, ...],
              variant_of: str | None = None, **case_kwargs: Any) -> Part:
    return Part(name, Case(name, callbacks=build, **case_kwargs), keys, cores, variant_of=variant_of)


def _registered(name: str, keys: tuple[str, ...], cores: tuple[str, ...], optimizer: str = "sgd",
                resume: str = "anywhere", **overrides: Any) -> Part:
    """A registered strategy name with its registered settings, ``overrides`` applied (so it acts in 4 steps)."""

    def build() -> Any:
        entry = StrategyRegistry[name]
        return entry["strategy"](process_group_backend="gloo", **{**entry["init_params"], **overrides})

    return Part(name, Case(name, strategy=build, optimizer=optimizer), keys, cores, resume=resume)


_BATCH = ("batch_size", "samples_seen_total", "test_statistic", "noise_scale", "accumulate_grad_batches",
          "per_device_batch_size", "step_overhead_ms", "nonfinite_skipped_total")
_COMPRESS = ("bytes_sent_total", "ratio", "residual_norm", "nonfinite_skipped_total")
_LOCAL_SGD = ("sync_rounds_total", "bytes_sent_total", "pseudo_grad_norm", "replica_divergence",
              "nonfinite_skipped_total")


def _keys(part: str, names: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(f"convergence/{part}/{n}" for n in names)


def _entries() -> list[Part]:
    micro = lambda ws, acc: "microbatch" if ws * acc > 1 else "per_sample"  # noqa: E731  (needs 2 micro-batches)
    return [
        _callback(
            "AdaptiveBatchSize",
            lambda ws, acc: [AdaptiveBatchSize(max_batch_size=64, variance_estimator=micro(ws, acc), smoothing=0.5)],
            _keys("batch", _BATCH), ("stats", "data"), owns_sampler=True,
        ),
        _callback(  # the per-device batch grows at epoch ends (the loader is rebuilt every epoch)
            "AdaptiveBatchSize-per-device",
            lambda ws, acc: [AdaptiveBatchSize(max_batch_size=64, max_per_device_batch_size=8,
                                               variance_estimator="per_sample", smoothing=0.5)],
            _keys("batch", _BATCH), ("stats", "data"), variant_of="AdaptiveBatchSize", owns_sampler=True,
            trainer_kwargs={"reload_dataloaders_every_n_epochs": 1},
        ),
        _callback("BudgetScheduleSync", lambda ws, acc: [BudgetScheduleSync()], (), ("optim",), optimizer="budget"),
        _callback(  # noise_dominated needs 2 micro-batches per step (it refuses accumulation 1 on 1 rank)
            "ConvergenceEarlyStopping",
            lambda ws, acc: [ConvergenceEarlyStopping(
                rules=["noise_dominated", "loss_curve"] if ws * acc > 1 else ["loss_curve"],
                check_every_n_steps=1, patience=10, min_points=4, window=2, verbose=False,
            )],
            _keys("stop", ("required_batch", "grad_sq_upper", "noise_streak", "curve_streak", "stopped")),
            ("stopping", "stats"),
        ),
        _callback(  # a large tau and no grace: parameters freeze within the 4 steps, so the frozen set resumes too
            "GradientEarlyStopping",
            lambda ws, acc: [GradientEarlyStopping(tau=0.5, grace_fraction=0.25, total_steps=4, min_ndim=1,
                                                   stop_training=False)],
            _keys("stop", ("frozen_fraction", "frozen_total", "frozen_numel_total", "nonfinite_skipped_total")),
            ("stopping",),
        ),
        _callback(
            "GradientStatsMonitor", lambda ws, acc: [GradientStatsMonitor(log_every_n_steps=1)],
            _keys("grad_stats", ("grad_l2_norm", "grad_l1_norm", "noise_scale", "trace_cov", "grad_sq_norm",
                                 "step_overhead_ms", "nonfinite_skipped_total")),
            ("stats",),
        ),
        _callback(
            "GradientVarianceSampling",
            lambda ws, acc: [GradientVarianceSampling(policy="gvm", check_every_n_steps=1, probe_per_group=2, seed=3)],
            _keys("sampling", ("grad_variance", "grad_variance_uniform", "effective_sample_size",
                               "nonfinite_skipped_total", "step_overhead_ms")),
            ("sampling",), owns_sampler=True,
        ),
        _callback("ScheduleFreeModeSwitch", lambda ws, acc: [ScheduleFreeModeSwitch()], (), (),
                  optimizer="schedule_free"),
        _callback(
            "ScheduleRefinement", lambda ws, acc: [ScheduleRefinement(online=True, refit_every_n_steps=2)],
            _keys("schedule", ("lr", "grad_norm", "nonfinite_skipped_total")), ("optim",),
        ),
        # Compressed DDP: the registered names with their registered settings.
        *(_registered(n, _keys("compress", _COMPRESS), ("compress", "feedback", "comm"))
          for n in ("ddp_ef21", "ddp_ef21_sgdm", "ddp_econtrol", "ddp_ef14")),
        # The local-SGD family synchronises every 2 steps here (the registered 8 or 32 never would in 4 steps).
        *(_registered(n, _keys("local_sgd", _LOCAL_SGD), ("averaging",), schedule=2)
          for n in ("local_sgd", "diloco", "noloco", "co2")),
        _registered(  # 2 fragments of TinyNet's 2 layers, H=4, overlap 1: fragment 0 merges at step 3, 1 at step 5
            "streaming_diloco",
            _keys("local_sgd", (*_LOCAL_SGD, "link_bytes_total", "fragment_sync_bytes", "peak_step_bytes",
                                "sync_wait_ms", "quantization_error")),
            ("averaging",), num_fragments=2, sync_every=4, overlap_steps=1, block_size=8,
        ),
        _registered("demo", _keys("compress", ("link_bytes_per_rank_total", "ratio", "nonfinite_skipped_total")),
                    ("optim",), optimizer="demo"),
        _registered("onebit_adam", _keys("compress", ("link_bytes_per_rank_total", "ratio",
                                                      "nonfinite_skipped_total")),
                    ("optim",), optimizer="onebit_adam"),
        # async_fl: the server is one Lightning process that forks its clients, and in-flight client work is by
        # design not part of a checkpoint; test_async_fl_resumes_at_every_server_step covers it.
        _registered("async_fl", (), ("federated",), resume="own"),
    ]


PARTS: dict[str, Part] = {p.name: p for p in _entries()}


def discovered_parts() -> set[str]:
    """Every public callback class and every strategy name registered by ``lightning_convergence``."""
    callbacks = {n for n in public_callbacks.__all__
                 if isinstance(getattr(public_callbacks, n), type) and n not in NOT_PARTS}
    strategies = {n for n in StrategyRegistry
                  if StrategyRegistry[n]["strategy"].__module__.startswith("lightning_convergence")}
    return callbacks | strategies


def part_class(part: Part) -> type:
    """The adapter class of a part: the callback class, or the class a strategy name is registered with."""
    if part.base in StrategyRegistry:
        return StrategyRegistry[part.base]["strategy"]
    return getattr(public_callbacks, part.base)
