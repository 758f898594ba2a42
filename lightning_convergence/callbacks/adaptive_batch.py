"""Grow the global batch size during training from gradient statistics (AdAdaGrad tests or the noise scale)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.data import extract_batch_size
from torch import Tensor
from typing_extensions import override

from lightning_convergence import stats
from lightning_convergence._checks import check_state_version
from lightning_convergence._metrics import log_metrics, should_log
from lightning_convergence._nonfinite import check_nonfinite_policy
from lightning_convergence.callbacks._batch_control import BatchControl
from lightning_convergence.callbacks._common import (
    finite_metrics,
    handle_nonfinite,
    hook_loss_factor,
    probe_loss,
    sum_all_reduce,
)
from lightning_convergence.data import wrap_train_dataloader
from lightning_convergence.data.batch_plan import check_adaptive_batch_args
from lightning_convergence.data.resizable import BatchSizeController
from lightning_convergence.stats.capture import StepGradientSamples
from lightning_convergence.stats.module_grads import BatchLossFn

__all__ = ["AdaptiveBatchSize"]



class AdaptiveBatchSize(BatchControl, Callback):
    """Grow the global batch size when the gradient gets noisy relative to its norm (AdAdaGrad's tests).

    Paper: Lau, Liu, Kolar. *AdAdaGrad: Adaptive Batch Size Schemes for Adaptive Gradient Methods.*
    arXiv:2402.11215, 2024 (tests; update ``b ← min(max(b, b_test), b_max)``). Noise-scale rule: McCandlish, Kaplan,
    Amodei, arXiv:1812.06162 (batch = ``B_simple``). LR scaling: Goyal et al. 2017 (linear, SGD); Malladi et al.,
    NeurIPS 2022 (square root, Adam-type). Method card: ``docs/algorithms/adaptive_batch.md`` (how the batch changes
    inside Lightning, the estimators, costs).

    The math is in the cores: the tests in :func:`~lightning_convergence.stats.demanded_batch_size` and
    :func:`~lightning_convergence.stats.next_batch_size`, the ``(per_device, accumulation)`` plan and LR scaling in
    :mod:`lightning_convergence.data.batch_plan`, the per-step gradient samples in
    :class:`~lightning_convergence.stats.StepGradientSamples`. This callback decides when: a test every
    ``check_every_n_steps`` optimizer steps in ``on_before_optimizer_step``; accumulation changes right after a step
    whose batch count allows it, the per-device batch (``max_per_device_batch_size``) at epoch boundaries through a
    :class:`~lightning_convergence.data.ResizableBatchSampler`. Decisions are broadcast from rank 0.

    Deviations: (1) the test runs on the step's own gradients before the update (the paper tests after it, at the same
    weights). (2) ``smoothing`` averages the statistics with a bias-corrected EMA before the test (0 = the paper).
    (3) LR scaling also multiplies schedulers' ``base_lrs`` and ``initial_lr``. (4) Unequal micro-batches count as
    their mean size. (5) ``per_sample`` with accumulation takes the covariance terms from a sub-batch and ``‖ḡ‖²`` from
    the whole step.

    Args:
        test: ``"norm"`` (η), ``"inner_product"`` (θ), ``"augmented"`` (max of inner-product and orthogonality, θ
            and ν) or ``"noise_scale"`` (batch = ``noise_scale_factor × B_simple``). Default ``"norm"``.
        eta: η > 0 of the norm test. Default ``0.1`` (paper); larger η grows the batch less (0.5 is milder).
        theta: θ > 0 of the inner-product test. Default ``0.1`` (paper default; README examples use 0.5).
        nu: ν > 0 of the orthogonality test. Default ``0.1`` (paper default; README examples use 1.0).
        noise_scale_factor: multiplier of ``B_simple`` for ``test="noise_scale"``, > 0. Default ``1.0``.
        check_every_n_steps: run the test every this many optimizer steps, ≥ 1. Default ``1`` (paper); 4-10 keeps
            the copying tests (inner product, augmented) under a few percent of a step on small models.
        min_batch_size: lower bound of the global batch, ≥ 1; applied at the start of training. Default ``None``
            (the initial global batch).
        max_batch_size: upper bound of the global batch (``b_max``). Default ``None``: the training set's size (one
            epoch per optimizer step at most; a warning says once when it binds), or unbounded without a length.
        max_growth_factor: at most this growth per test, > 1, or ``None`` (paper: no cap). Default ``2.0``.
        allow_shrink: let the batch decrease when the test demands less. Default ``False`` (paper).
        max_per_device_batch_size: the largest per-device batch; ``None`` (default) keeps the per-device batch and
            grows only accumulation.
        lr_scaling: ``"none"``, ``"linear"`` (SGD) or ``"sqrt"`` (Adam-type); on a batch change of ``×k`` every
            param group's lr is multiplied by ``k`` or ``√k``. Default ``"none"``.
        variance_estimator: ``"microbatch"`` (the step's micro-batch and per-rank gradients, no extra backward),
            ``"per_sample"`` (exact per-example gradients of a sub-batch) or ``"auto"`` (default: micro-batch when a
            step has ≥ 2 micro-batch gradients, else per-sample; said once in the log).
        loss_fn: per-example loss for ``"per_sample"``, ``loss_fn(output, target) -> scalar`` on a batch of one
            (e.g. ``torch.nn.functional.cross_entropy``; in YAML ``loss_fn: torch.nn.functional.cross_entropy``).
            Default ``None``: use ``pl_module.per_sample_loss`` if it exists, else ``batch_loss_fn``.
        batch_loss_fn: ``batch_loss_fn(module, batch) -> scalar`` mean loss of any batch, for ``"per_sample"``.
            Default ``None``: the module's ``training_step`` (its ``self.log`` calls are silenced).
        per_sample_max_examples: examples per rank used by ``"per_sample"``, ≥ 2. Default ``64``.
        smoothing: EMA factor in [0, 1) for the statistics before the test. Default ``0.9`` (see Deviations).
        noise_ema_beta: EMA factor in [0, 1) of the gradient-noise-scale numerator and denominator. Default ``0.9``.
        seed: seed of the single-process shuffling sampler. Default ``0``.
        log_every_n_steps: log on test steps that fall on a multiple of this, ≥ 1. Default ``None``: the trainer's
            ``log_every_n_steps``.
        on_nonfinite: ``"stop"`` (default) or ``"skip"``: the shared non-finite policy
            (``lightning_convergence._nonfinite``) for non-finite statistics on a test step; the step is not applied
            and the batch plan does not change.

    State: global/target/per-device batch, accumulation (and a pending change), sampler position, last re-planned
    epoch, samples seen, statistics and noise-scale EMAs, non-finite skips, ``version``.

    Logs (test steps at multiples of ``log_every_n_steps``): ``convergence/batch/batch_size`` (real global batch),
    ``convergence/batch/samples_seen_total``, ``convergence/batch/test_statistic`` (the demanded batch),
    ``convergence/batch/noise_scale``, ``convergence/batch/accumulate_grad_batches``,
    ``convergence/batch/per_device_batch_size``, ``convergence/batch/step_overhead_ms`` (mean over the tests since
    the last log), ``convergence/batch/nonfinite_skipped_total``.

    Raises:
        ValueError: for an unknown ``test``/``lr_scaling``/``variance_estimator``, a parameter out of range, or at
            setup: the micro-batch estimator with one micro-batch per step and one device; per-device growth
            without ``reload_dataloaders_every_n_epochs=1``; ``per_sample`` without a loss function.
        RuntimeError: at setup, with manual optimization, a ``GradientAccumulationScheduler``, or a strategy that
            accumulates gradients itself (DeepSpeed).
        TypeError: if ``loss_fn`` is not callable, the train loader has a custom batch sampler (it cannot be
            resized), or ``per_sample`` meets a batch that is not ``(inputs, targets, ...)``.

    Example::

        Trainer(accumulate_grad_batches=2, callbacks=[AdaptiveBatchSize(test="norm", eta=0.5, max_batch_size=1024,
                                                                        lr_scaling="sqrt")])
    """

    STATE_VERSION = 1

    def __init__(
        self,
        test: str = "norm",
        eta: float = 0.1,
        theta: float = 0.1,
        nu: float = 0.1,
        noise_scale_factor: float = 1.0,
        check_every_n_steps: int = 1,
        min_batch_size: int | None = None,
        max_batch_size: int | None = None,
        max_growth_factor: float | None = 2.0,
        allow_shrink: bool = False,
        max_per_device_batch_size: int | None = None,
        lr_scaling: str = "none",
        variance_estimator: str = "auto",
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        batch_loss_fn: BatchLossFn | None = None,
        per_sample_max_examples: int = 64,
        smoothing: float = 0.9,
        noise_ema_beta: float = 0.9,
        seed: int = 0,
        log_every_n_steps: int | None = None,
        on_nonfinite: str = "stop",
    ) -> None:
        name = type(self).__name__
        self.on_nonfinite = check_nonfinite_policy(name, on_nonfinite)
        self._nonfinite_warned = False
        check_adaptive_batch_args(
            name, test=test, lr_scaling=lr_scaling, variance_estimator=variance_estimator, eta=eta, theta=theta, nu=nu,
            noise_scale_factor=noise_scale_factor, check_every_n_steps=check_every_n_steps,
            min_batch_size=min_batch_size, max_batch_size=max_batch_size,
            max_per_device_batch_size=max_per_device_batch_size, per_sample_max_examples=per_sample_max_examples,
            log_every_n_steps=log_every_n_steps, max_growth_factor=max_growth_factor, smoothing=smoothing,
            noise_ema_beta=noise_ema_beta, loss_fn=loss_fn, batch_loss_fn=batch_loss_fn,
        )
        self.test, self.eta, self.theta, self.nu = test, float(eta), float(theta), float(nu)
        self.noise_scale_factor = float(noise_scale_factor)
        self.check_every_n_steps = check_every_n_steps
        self.min_batch_size, self.max_batch_size = min_batch_size, max_batch_size
        self.max_growth_factor = None if max_growth_factor is None else float(max_growth_factor)
        self.allow_shrink, self.max_per_device_batch_size = allow_shrink, max_per_device_batch_size
        self.lr_scaling, self.variance_estimator = lr_scaling, variance_estimator
        self.loss_fn, self.batch_loss_fn = loss_fn, batch_loss_fn
        self.estimator = variance_estimator  # resolved at setup when "auto"
        self.dataset_size: int | None = None  # examples per epoch (the default bound), read from the train loader
        self._bound_warned = False
        self._probe_loss: BatchLossFn | None = None
        self.per_sample_max_examples, self.smoothing = per_sample_max_examples, float(smoothing)
        self.seed, self.log_every_n_steps = int(seed), log_every_n_steps
        # -- state --
        self.controller = BatchSizeController(1)
        self.tracker = stats.GradientNoiseScale(beta=float(noise_ema_beta))
        self._emas = {k: stats.BiasCorrectedEMA(self.smoothing) for k in ("trace_cov", "grad_sq_norm", "inner_var")}
        self.global_batch_size = self.target_batch_size = 0  # the real global batch (0 until training starts)
        self.accumulation = 0
        self.pending_accumulation: int | None = None
        self.samples_seen_total = 0
        self.last_epoch_ended = -1  # the last training epoch whose end-of-epoch re-plan has run
        self.nonfinite_skipped_total = 0
        self.last_demanded = math.nan
        self.history: list[dict[str, float]] = []  # one entry per test: step, demanded, target, batch_size
        self.last_metrics: dict[str, float] = {}
        self.overhead_total_s = 0.0  # time spent in this callback's statistics (not checkpointed: a timing)
        self._controller_ready = False
        self._restored = False
        # -- per-step scratch --
        self._undo: Callable[[], None] | None = None
        # Norm test and noise scale need only Σ‖x_i‖² and the step's gradient: stream instead of storing copies.
        self._samples = StepGradientSamples(
            "microbatch", test in ("norm", "noise_scale"), per_sample_max_examples, type(self).__name__
        )
        self._step_at_batch_start = -1
        self._overhead_s = 0.0  # statistics time since the last log (capture hooks included)
        self._tests_since_log = 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(test=self.test, variance_estimator=self.variance_estimator)

    # -- setup ------------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._resolve_estimator(trainer)
        self._check_trainer(trainer, pl_module)
        self._probe_loss = self._batch_loss(pl_module)
        self._samples.attach([p for p in pl_module.parameters() if p.requires_grad])
        self._undo = wrap_train_dataloader(trainer, self._install_sampler)

    def _resolve_estimator(self, trainer: Trainer) -> None:
        self.estimator = self.variance_estimator
        if self.estimator == "auto":
            samples = trainer.accumulate_grad_batches * trainer.world_size
            self.estimator = "microbatch" if samples >= 2 else "per_sample"
            rank_zero_info(
                f"{type(self).__name__}: variance_estimator='auto' chose {self.estimator!r} "
                f"(accumulate_grad_batches={trainer.accumulate_grad_batches}, {trainer.world_size} device(s))."
            )
        self._samples.set_estimator(self.estimator)

    def _batch_loss(self, pl_module: LightningModule) -> BatchLossFn | None:
        output_loss = self.loss_fn if self.loss_fn is not None else getattr(pl_module, "per_sample_loss", None)
        return probe_loss(type(self).__name__, self.batch_loss_fn, output_loss)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._samples.detach()
        if self._undo is not None:
            self._undo()
            self._undo = None

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        world = trainer.world_size
        if self._restored and self.accumulation:
            trainer.accumulate_grad_batches = self.accumulation
            self._resume_position(trainer)
        else:
            self.accumulation = int(trainer.accumulate_grad_batches)
            self.global_batch_size = self.controller.batch_size * world * self.accumulation
            self.target_batch_size = self.global_batch_size
            if self.min_batch_size is not None and self.global_batch_size < self.min_batch_size:
                self.target_batch_size = self.min_batch_size
                # The loader of this epoch exists already: only accumulation can change before the first epoch ends.
                self._replan(trainer, resize_device=False, apply_now=True)

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.controller.start_epoch(trainer.current_epoch)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Lightning calls this hook a second time for the same epoch when it resumes (with `max_steps`) a checkpoint
        # written in it after this callback's call: the re-plan is made once per epoch.
        if self.last_epoch_ended < trainer.current_epoch:
            self._end_epoch(trainer, trainer.current_epoch)

    # -- per step ---------------------------------------------------------------------------------------------
    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        n = _batch_size(batch)
        self.controller.consume(n)
        self.samples_seen_total += n * trainer.world_size
        self._step_at_batch_start = trainer.global_step
        self._samples.begin_batch(batch, n, capturing=trainer.global_step % self.check_every_n_steps == 0)

    @override
    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._samples.end_backward()

    @override
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self._samples.capturing:
            return
        t0 = time.perf_counter()
        sample_stats = self._sample_stats(trainer, pl_module)
        self._reset_capture()
        demanded = math.nan
        if sample_stats is not None:
            values = (sample_stats.trace_cov, sample_stats.grad_sq_norm, sample_stats.inner_var)
            if all(math.isfinite(v) for v in values):
                demanded = self._demand(sample_stats)
        bad = sample_stats is not None and math.isnan(demanded)
        bad, self._nonfinite_warned = handle_nonfinite(trainer, pl_module, type(self).__name__, self.on_nonfinite,
                                                       bad, self._nonfinite_warned)
        if bad:
            self.nonfinite_skipped_total += 1
            demanded = math.nan
        demanded = float(trainer.strategy.broadcast(demanded, src=0))
        self.last_demanded = demanded
        if math.isnan(demanded):  # no measurement (skipped): keep the current plan, pending change included
            target = self.target_batch_size
        else:
            target = stats.next_batch_size(
                self.global_batch_size, demanded, self.min_batch_size or 1, self._max_batch(),
                self.max_growth_factor, self.allow_shrink,
            )
            self._warn_if_bounded(demanded)
            self.target_batch_size = target
            self._replan(trainer, resize_device=False, apply_now=False)
        self.history.append({
            "step": trainer.global_step, "demanded": demanded, "target": target, "batch_size": self.global_batch_size,
        })
        self._overhead_s += time.perf_counter() - t0
        capture_s = self._samples.take_capture_time()
        self._overhead_s += capture_s
        self.overhead_total_s += time.perf_counter() - t0 + capture_s
        self._tests_since_log += 1
        if should_log(trainer, self.log_every_n_steps):
            self._log(trainer)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        stepped = trainer.global_step > self._step_at_batch_start
        if stepped and self.pending_accumulation is not None and (batch_idx + 1) % self.pending_accumulation == 0:
            self._set_batch(trainer, self.controller.batch_size, self.pending_accumulation)

    # -- internals --------------------------------------------------------------------------------------------
    def _sample_stats(self, trainer: Trainer, pl_module: LightningModule) -> stats.SampleGradStats | None:
        return self._samples.stats(
            world_size=trainer.world_size,
            # Lightning divides each micro-batch loss by the accumulation factor; AMP multiplies it by the loss scale.
            loss_factor=hook_loss_factor(trainer),
            all_reduce=sum_all_reduce(trainer),
            pl_module=pl_module,
            loss_fn=self._probe_loss,
            global_batch=self.global_batch_size,
        )

    def _demand(self, s: stats.SampleGradStats) -> float:
        self.tracker.update(stats.noise_estimate(s))
        if self.smoothing > 0:
            s = stats.SampleGradStats(count=s.count, **{k: ema.update(getattr(s, k)) for k, ema in self._emas.items()})
        return stats.demanded_batch_size(self.test, s, eta=self.eta, theta=self.theta, nu=self.nu,
                                         noise_scale=self.tracker.noise_scale,
                                         noise_scale_factor=self.noise_scale_factor)

    def _reset_capture(self) -> None:
        self._samples.reset()

    def _log(self, trainer: Trainer) -> None:
        metrics = {
            "batch_size": self.global_batch_size,
            "samples_seen_total": self.samples_seen_total,
            "test_statistic": self.last_demanded,
            "noise_scale": self.tracker.noise_scale,
            "accumulate_grad_batches": self.accumulation,
            "per_device_batch_size": self.controller.batch_size,
            "step_overhead_ms": 1e3 * self._overhead_s / max(self._tests_since_log, 1),
            "nonfinite_skipped_total": self.nonfinite_skipped_total,
        }
        self._overhead_s = 0.0
        self._tests_since_log = 0
        self.last_metrics = log_metrics(trainer, "batch", finite_metrics(trainer, "batch", metrics))

    # -- state ------------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": self.STATE_VERSION,
            "global_batch_size": self.global_batch_size,
            "target_batch_size": self.target_batch_size,
            "accumulate_grad_batches": self.accumulation,
            "pending_accumulation": self.pending_accumulation,
            "per_device_batch_size": self.controller.batch_size,
            "sampler": self.controller.state_dict(),
            "samples_seen_total": self.samples_seen_total,
            "last_epoch_ended": self.last_epoch_ended,
            "noise": self.tracker.state_dict(),
            "smoothing": {k: ema.state_dict() for k, ema in self._emas.items()},
            "nonfinite_skipped_total": self.nonfinite_skipped_total,
            "last_demanded": self.last_demanded,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_state_version(type(self).__name__, state_dict, self.STATE_VERSION)
        self.global_batch_size = int(state_dict["global_batch_size"])
        self.target_batch_size = int(state_dict["target_batch_size"])
        self.accumulation = int(state_dict["accumulate_grad_batches"])
        pending = state_dict["pending_accumulation"]
        self.pending_accumulation = None if pending is None else int(pending)
        self.controller.load_state_dict(state_dict["sampler"])
        self.samples_seen_total = int(state_dict["samples_seen_total"])
        # Absent from checkpoints written before it existed: the epoch before the sampler's (a re-plan is idempotent).
        self.last_epoch_ended = int(state_dict.get("last_epoch_ended", (self.controller.epoch or 0) - 1))
        self.tracker.load_state_dict(state_dict["noise"])
        for k, ema in self._emas.items():
            ema.load_state_dict(state_dict["smoothing"][k])
        self.nonfinite_skipped_total = int(state_dict["nonfinite_skipped_total"])
        self.last_demanded = float(state_dict["last_demanded"])
        self._restored = True


def _batch_size(batch: Any) -> int:
    """Examples in ``batch``: the fast path for ``(tensor, ...)`` batches, else Lightning's pytree search."""
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor) and batch[0].dim() > 0:
        return int(batch[0].shape[0])
    return int(extract_batch_size(batch))
