"""Log gradient norms and the gradient noise scale from any LightningModule, DDP and accumulation included."""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.data import extract_batch_size
from torch import Tensor
from typing_extensions import override

from lightning_convergence import stats
from lightning_convergence._checks import argument_error, check_int, check_number, check_state_version
from lightning_convergence._metrics import log_metrics, should_log
from lightning_convergence._nonfinite import check_nonfinite_policy
from lightning_convergence.callbacks._common import finite_metrics, handle_nonfinite, hook_loss_factor, sum_all_reduce

__all__ = ["GradientStatsMonitor"]

_NORM_TYPES = ("l1", "l2")


class GradientStatsMonitor(Callback):
    """Log gradient norms and McCandlish et al.'s gradient noise scale every ``log_every_n_steps`` optimizer steps.

    Paper: McCandlish, Kaplan, Amodei. *An Empirical Model of Large-Batch Training.* arXiv:1812.06162, 2018
    (App. A: the unbiased two-batch-size estimator of ``B_simple = tr(Σ)/|G|²``).

    How the two batch sizes arise without extra backward passes: a tensor hook on every parameter sees each
    micro-batch's *local* gradient before DDP all-reduces it or accumulation sums it, and adds its squared norm up.
    ``b_small`` is the per-device micro-batch, ``b_big`` the global batch (micro-batch × accumulation × world size)
    whose gradient the optimizer sees. With one device and no accumulation the two coincide: then no noise scale can
    be measured, and the monitor says so once at fit start (use ``accumulate_grad_batches`` ≥ 2 or several devices,
    or ``AdaptiveBatchSize``, whose per-example estimator works on one device).

    Non-finite gradients (checked on measuring steps): the shared policy ``on_nonfinite`` of
    ``lightning_convergence._nonfinite``; the step's gradients are dropped so the optimizer does not apply it, and
    the monitor's norm keys are removed from ``trainer.callback_metrics`` (no stale value stays there).

    Deviations: micro-batches of unequal size (a short last batch) are treated as if equal to their mean size, a
    small bias on that one step. Norms are taken after AMP unscaling and before gradient clipping.

    Args:
        log_every_n_steps: measure and log every this many optimizer steps, ≥ 1. Default ``None``: the trainer's
            ``log_every_n_steps``. Steps in between cost nothing (hooks return at once).
        norm_types: which global gradient norms to log, a subset of ``("l1", "l2")``. Default both.
        noise_scale: estimate the gradient noise scale. Default ``True``.
        ema_beta: EMA factor for the noise-scale numerator and denominator, in [0, 1). Default ``0.9``: with one
            measurement every few steps, 0.99 (gpt-neox's value) would react over thousands of steps.
        log_per_item: also log each parameter's l2 norm as ``convergence/grad_stats/grad_l2_norm/<name>``.
            Default ``False``.
        on_nonfinite: ``"stop"`` (default: stop training with a message, like Lightning's
            ``EarlyStopping(check_finite=True)``) or ``"skip"`` (drop the step, count it, warn once).

    State: the noise-scale EMAs, the count of skipped non-finite steps, and a ``version`` key.

    Logs: ``convergence/grad_stats/grad_l2_norm``, ``convergence/grad_stats/grad_l1_norm``,
    ``convergence/grad_stats/noise_scale`` (EMA), ``convergence/grad_stats/trace_cov``,
    ``convergence/grad_stats/grad_sq_norm`` (the latest unbiased estimates),
    ``convergence/grad_stats/step_overhead_ms``,
    ``convergence/grad_stats/nonfinite_skipped_total``, and with ``log_per_item``
    ``convergence/grad_stats/grad_l2_norm/<param>``.

    Raises:
        ValueError: for ``log_every_n_steps`` < 1, an unknown norm type, ``ema_beta`` outside [0, 1), or an unknown
            ``on_nonfinite``.

    Example::

        Trainer(callbacks=[GradientStatsMonitor(log_every_n_steps=10)], accumulate_grad_batches=4)
    """

    STATE_VERSION = 1

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        norm_types: tuple[str, ...] | list[str] = ("l1", "l2"),
        noise_scale: bool = True,
        ema_beta: float = 0.9,
        log_per_item: bool = False,
        on_nonfinite: str = "stop",
    ) -> None:
        owner = "GradientStatsMonitor"
        self.log_every_n_steps = check_int(owner, "log_every_n_steps", log_every_n_steps, 1, optional=True)
        if isinstance(norm_types, str) or any(t not in _NORM_TYPES for t in norm_types):
            raise argument_error(owner, "norm_types", "a list of entries from 'l1', 'l2'", norm_types)
        self.norm_types = tuple(norm_types)
        self.noise_scale = noise_scale
        self.ema_beta = check_number(owner, "ema_beta", ema_beta, 0, 1, high_open=True)
        self.log_per_item = log_per_item
        self.on_nonfinite = check_nonfinite_policy("GradientStatsMonitor", on_nonfinite)
        self._nonfinite_warned = False
        self._owner = type(self).__name__  # an embedding part (ConvergenceEarlyStopping) reports under its own name
        self._writes_metrics = True  # False inside ConvergenceEarlyStopping: one owner per `grad_stats` key
        self._one_size_noted = False
        self.tracker = stats.GradientNoiseScale(beta=self.ema_beta)
        self.nonfinite_skipped_total = 0
        self.last_metrics: dict[str, float] = {}
        # The shared capture (stats core), streaming: one squared norm per micro-batch, no gradient copies.
        self._capture = stats.StepGradientSamples("microbatch", streaming=True, per_sample_max_examples=0,
                                                  owner=type(self).__name__)
        self._overhead_s = 0.0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(log_every_n_steps=self.log_every_n_steps, noise_scale=self.noise_scale)

    # -- hooks ------------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and self.noise_scale:
            self._capture.attach([p for p in pl_module.parameters() if p.requires_grad])
            if (trainer.world_size * trainer.accumulate_grad_batches < 2 and not self._one_size_noted
                    and self._writes_metrics):
                self._one_size_noted = True
                rank_zero_info(
                    f"{type(self).__name__}: one device and `accumulate_grad_batches`=1 give a single batch size, so "
                    "no noise scale is logged; set `accumulate_grad_batches` >= 2 (or several devices) to measure it."
                )

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._capture.detach()

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        capturing = self.noise_scale and should_log(trainer, self.log_every_n_steps)
        self._capture.begin_batch(batch, int(extract_batch_size(batch)) if capturing else 0, capturing)

    @override
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not should_log(trainer, self.log_every_n_steps):
            return
        t0 = time.perf_counter()
        grads = stats.grads_of(pl_module.parameters())
        if not grads:
            return
        metrics: dict[str, float | Tensor] = {}
        # One fused pass gives the per-tensor l2 norms; the global l2, |G|^2 and (on the fast path) finiteness
        # follow from it. Only a non-finite l2 needs the exact check (it may be an overflow of finite values).
        norms = stats.per_tensor_norms(grads, 2.0)
        sq = norms.pow(2).sum()
        found = not (bool(torch.isfinite(sq)) or stats.all_finite(grads))
        found, self._nonfinite_warned = handle_nonfinite(trainer, pl_module, self._owner, self.on_nonfinite,
                                                         found, self._nonfinite_warned)
        if found:
            self.nonfinite_skipped_total += 1
            for name in ("grad_l2_norm", "grad_l1_norm", "noise_scale", "trace_cov", "grad_sq_norm"):
                metrics[name] = math.nan  # removed from callback_metrics below, never logged
        else:
            if "l2" in self.norm_types:
                metrics["grad_l2_norm"] = sq.sqrt()
            if "l1" in self.norm_types:
                metrics["grad_l1_norm"] = stats.l1_norm(grads)
            if self.log_per_item:
                names = [n for n, p in pl_module.named_parameters() if p.grad is not None]
                for name, norm in zip(names, norms.tolist()):
                    metrics[f"grad_l2_norm/{name}"] = norm
            if self._capture.capturing:
                metrics.update(self._noise_metrics(trainer, sq))
        self._capture.reset()
        metrics["nonfinite_skipped_total"] = self.nonfinite_skipped_total
        self._overhead_s += time.perf_counter() - t0 + self._capture.take_capture_time()
        metrics["step_overhead_ms"] = 1e3 * self._overhead_s
        self._overhead_s = 0.0
        if self._writes_metrics:
            self.last_metrics = log_metrics(trainer, "grad_stats", finite_metrics(trainer, "grad_stats", metrics))

    # -- internals --------------------------------------------------------------------------------------------
    def _noise_metrics(self, trainer: Trainer, grad_sq_norm: Tensor) -> dict[str, float]:
        all_reduce = sum_all_reduce(trainer)
        measured = self._capture.noise(hook_loss_factor(trainer), all_reduce, big_sq_norm=grad_sq_norm)
        if measured is None:  # one micro-batch on one device: a single batch size, nothing to compare
            return {}
        est, _ = measured
        ema = self.tracker.update(est)
        return {"noise_scale": ema, "trace_cov": est.trace_cov, "grad_sq_norm": est.grad_sq_norm}

    # -- state ------------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": self.STATE_VERSION,
            "tracker": self.tracker.state_dict(),
            "nonfinite_skipped_total": self.nonfinite_skipped_total,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_state_version(type(self).__name__, state_dict, self.STATE_VERSION)
        self.tracker.load_state_dict(state_dict["tracker"])
        self.nonfinite_skipped_total = int(state_dict["nonfinite_skipped_total"])

