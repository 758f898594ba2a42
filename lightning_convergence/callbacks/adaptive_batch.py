"""Grow the global batch size during training from gradient statistics (AdAdaGrad tests or the noise scale)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.data import extract_batch_size
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, RandomSampler
from typing_extensions import override

from lightning_convergence import stats
from lightning_convergence._checks import check_int_at_least, check_state_version
from lightning_convergence._metrics import log_metrics, should_log
from lightning_convergence._nonfinite import check_nonfinite_policy
from lightning_convergence.callbacks._common import finite_metrics, handle_nonfinite, hook_loss_factor, probe_loss
from lightning_convergence.data import rebuild_dataloader, wrap_train_dataloader
from lightning_convergence.data.resizable import BatchSizeController, EpochShuffleSampler, ResizableBatchSampler
from lightning_convergence.stats.capture import StepGradientSamples
from lightning_convergence.stats.module_grads import BatchLossFn

__all__ = ["AdaptiveBatchSize", "plan_batch"]

_TESTS = ("norm", "inner_product", "augmented", "noise_scale")
_ESTIMATORS = ("auto", "microbatch", "per_sample")
_LR_SCALING = ("none", "linear", "sqrt")


def plan_batch(
    target: int, world_size: int, per_device: int, accumulation: int, max_per_device: int | None,
    max_batch_size: int | None, resize_device: bool, min_accumulation: int = 1,
) -> tuple[int, int]:
    """The ``(per_device, accumulation)`` whose global batch ``per_device × world_size × accumulation`` is the
    smallest achievable one ≥ ``target`` (or the largest ≤ ``max_batch_size`` when rounding up would pass it).

    With ``resize_device`` (at an epoch boundary) the per-device batch may change, up to ``max_per_device``, and
    accumulation is the smallest that fits, at least ``min_accumulation`` (2 keeps two micro-batch gradient samples
    per step on one device); otherwise only the accumulation changes.
    """
    if resize_device and max_per_device is not None:
        accumulation = max(math.ceil(target / (world_size * max_per_device)), min_accumulation, 1)
        per_device = max(min(math.ceil(target / (world_size * accumulation)), max_per_device), 1)
        if max_batch_size is not None and per_device * world_size * accumulation > max_batch_size:
            per_device = max(max_batch_size // (world_size * accumulation), 1)
        return per_device, accumulation
    k = max(math.ceil(target / (world_size * per_device)), 1)
    if max_batch_size is not None and k > 1 and per_device * world_size * k > max_batch_size:
        k -= 1
    return per_device, k


class AdaptiveBatchSize(Callback):
    """Grow the global batch size when the gradient gets noisy relative to its norm (AdAdaGrad's tests).

    Paper: Lau, Liu, Kolar. *AdAdaGrad: Adaptive Batch Size Schemes for Adaptive Gradient Methods.*
    arXiv:2402.11215, 2024 (norm, inner-product and augmented inner-product tests; batch update
    ``b ← min(max(b, b_test), b_max)``). LR scaling: linear for SGD, square root for Adam-type optimizers as the
    batch grows (Goyal et al. 2017, arXiv:1706.02677; Malladi et al., *On the SDEs and Scaling Rules for Adaptive
    Gradient Algorithms*, NeurIPS 2022). Noise-scale rule: McCandlish, Kaplan, Amodei, *An Empirical Model of
    Large-Batch Training*, arXiv:1812.06162 (batch = ``B_simple``).

    How the batch changes (Lightning has no public API for it, issues #19286 and #21448): the global batch is
    ``per_device × devices × accumulate_grad_batches``. Mid-epoch only ``trainer.accumulate_grad_batches`` changes
    (memory stays flat): it is set right after an optimizer step, and only once the epoch's batch count is a
    multiple of the new value, because Lightning decides "step now" from ``batch_idx % accumulate_grad_batches``
    and zeroes gradients only when ``batch_idx % k == 0`` (a change at another point would give one short step,
    mis-scaled and carrying the previous step's gradient; the wait is at most ``new / gcd(old, new)`` steps, and an
    epoch start always qualifies). With ``max_per_device_batch_size`` the per-device batch also
    grows, at epoch boundaries, through a :class:`~lightning_convergence.data.ResizableBatchSampler` this callback
    installs in the train DataLoader (requires ``reload_dataloaders_every_n_epochs=1`` so Lightning recounts the
    epoch's batches; a mid-epoch change would make it skip end-of-epoch validation). Achievable sizes are
    multiples of ``per_device × devices``: the target is rounded up (down if that would pass ``max_batch_size``)
    and the real global batch is logged.

    Statistics. ``variance_estimator="auto"`` (default) picks ``"microbatch"`` when a step has at least two
    micro-batch gradients (``accumulate_grad_batches`` ≥ 2 or ≥ 2 devices) and ``"per_sample"`` otherwise (a bare
    ``Trainer()``), and says once in the log which it chose. ``"microbatch"``: tensor hooks capture each
    micro-batch's local gradient before accumulation and DDP's all-reduce (as :class:`GradientStatsMonitor` does);
    the ``k × devices`` micro-batch means are the samples, with ``scale`` = per-device batch, reduced across ranks
    by the law of total variance in :func:`~lightning_convergence.stats.sample_grad_stats`. No extra backward pass.
    For the ``inner_product`` and ``augmented`` tests the cost is one copy of the gradient per micro-batch on test
    steps and one all-reduce of a gradient-sized vector; the ``norm`` test and the noise-scale rule need only each
    micro-batch's squared norm and the step's gradient (the two-batch estimator, algebraically the same sample
    variance), so they store nothing and all-reduce two numbers. It needs at least 2 samples per step:
    ``accumulate_grad_batches ≥ 2`` or ≥ 2 devices (checked at setup; a per-device resize keeps 2 micro-batches on
    one device). ``"per_sample"``: exact per-example gradients with ``torch.func`` on the first
    ``per_sample_max_examples`` examples of the step's last micro-batch on each rank (AdAdaGrad's estimator; costs a
    vmapped backward); they give the covariance terms, and ``‖ḡ‖²`` is the step's whole gradient. The loss is the
    module's own ``training_step`` on the sub-batch (any batch shape: tuples, dicts, custom), or
    ``batch_loss_fn(module, batch)``, or ``loss_fn(output, target)`` / ``pl_module.per_sample_loss`` on ``(inputs,
    targets, ...)`` batches. Where ``vmap`` cannot trace the model (RNNs), it warns once and uses 8 micro-batch
    slices, one backward each.

    Bounds: the global batch never exceeds ``max_batch_size`` nor one epoch of the training set (with
    ``max_batch_size=None``), grows at most ``max_growth_factor`` per test, and a warning says once when a bound
    holds the batch below what the test demands.

    Decisions are computed from all-reduced statistics and broadcast from rank 0, so every rank acts alike.
    Single-process runs get a deterministic sampler: a plain ``RandomSampler`` is replaced by an
    :class:`~lightning_convergence.data.EpochShuffleSampler` seeded with ``seed`` (DDP runs use Lightning's
    ``DistributedSampler``), which makes a mid-epoch resume continue with the same batches.

    Deviations: (1) the test runs in ``on_before_optimizer_step`` on the step's own gradients (the paper tests
    after the step, at the same weights the gradient was taken at, which is the same point). (2) ``smoothing``
    (default 0.9) averages the statistics with a bias-corrected EMA before the test; the paper uses each batch
    alone. With the micro-batch estimator a step gives only ``k × devices`` samples, and the never-shrink rule
    would ratchet up on noise without it; set 0 for the paper's behaviour. (3) LR scaling also multiplies the
    schedulers' ``base_lrs`` and ``initial_lr``, so schedulers that recompute from them keep the scaling.
    (4) micro-batches of unequal size (a short last batch) count as their mean size, and ``samples_seen_total``
    assumes equal per-rank batches (as ``DistributedSampler`` gives). (5) ``per_sample`` with
    accumulation or a sub-batch: the covariance terms come from the sub-batch (inner products against the
    sub-batch mean), ``‖ḡ‖²`` from the whole step's gradient; with one micro-batch of at most
    ``per_sample_max_examples`` examples on one device this is exactly the paper's estimator.

    Args:
        test: ``"norm"`` (η), ``"inner_product"`` (θ), ``"augmented"`` (max of inner-product and orthogonality, θ
            and ν) or ``"noise_scale"`` (batch = ``noise_scale_factor × B_simple``). Default ``"norm"``.
        eta: η > 0 of the norm test. Default ``0.1`` (paper); larger η grows the batch less (0.5 is milder).
        theta: θ > 0 of the inner-product test. Default ``0.1`` (paper default; README examples use 0.5).
        nu: ν > 0 of the orthogonality test. Default ``0.1`` (paper default; README examples use 1.0).
        noise_scale_factor: multiplier of ``B_simple`` for ``test="noise_scale"``, > 0. Default ``1.0``.
        test_interval: run the test every this many optimizer steps, ≥ 1. Default ``1`` (paper); 4-10 keeps the
            cost of the copying tests (inner product, augmented) under a few percent of a step on small models.
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
        variance_estimator: ``"auto"``, ``"microbatch"`` or ``"per_sample"`` (see above). Default ``"auto"``.
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

    State: the global batch, its target, per-device batch and accumulation (and a pending accumulation change),
    the sampler position (epoch, examples consumed), the last epoch whose end-of-epoch re-plan ran, samples seen, the
    statistics and noise-scale EMAs, the count of skipped non-finite steps, and a ``version`` key. Hyperparameters
    come from the config.

    Logs (on test steps at multiples of ``log_every_n_steps``; ``step_overhead_ms`` is the mean over the tests since
    the last log): ``convergence/batch/batch_size`` (real global batch),
    ``convergence/batch/samples_seen_total``,
    ``convergence/batch/test_statistic`` (the batch the test demands), ``convergence/batch/noise_scale``,
    ``convergence/batch/accumulate_grad_batches``, ``convergence/batch/per_device_batch_size``,
    ``convergence/batch/step_overhead_ms``, ``convergence/batch/nonfinite_skipped_total``.

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
        test_interval: int = 1,
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
        for field, value, choices in (
            ("test", test, _TESTS), ("lr_scaling", lr_scaling, _LR_SCALING),
            ("variance_estimator", variance_estimator, _ESTIMATORS),
        ):
            if value not in choices:
                raise ValueError(f"{name}: `{field}` must be one of {choices}, got {value!r}.")
        for field, value in (("eta", eta), ("theta", theta), ("nu", nu), ("noise_scale_factor", noise_scale_factor)):
            if not float(value) > 0 or not math.isfinite(float(value)):
                raise ValueError(f"{name}: `{field}` must be a finite number > 0, got {value!r}.")
        for field, value, low in (
            ("test_interval", test_interval, 1), ("min_batch_size", min_batch_size, 1),
            ("max_batch_size", max_batch_size, 1), ("max_per_device_batch_size", max_per_device_batch_size, 1),
            ("per_sample_max_examples", per_sample_max_examples, 2), ("log_every_n_steps", log_every_n_steps, 1),
        ):
            if value is not None:
                check_int_at_least(name, field, value, low)
        if min_batch_size is not None and max_batch_size is not None and max_batch_size < min_batch_size:
            raise ValueError(
                f"{name}: `max_batch_size` must be >= `min_batch_size` ({min_batch_size}), got {max_batch_size}."
            )
        if max_growth_factor is not None and not float(max_growth_factor) > 1:
            raise ValueError(f"{name}: `max_growth_factor` must be > 1 or None, got {max_growth_factor!r}.")
        for field, value in (("smoothing", smoothing), ("noise_ema_beta", noise_ema_beta)):
            if not 0.0 <= float(value) < 1.0:
                raise ValueError(f"{name}: `{field}` must be in [0, 1), got {value!r}.")
        for field, fn in (("loss_fn", loss_fn), ("batch_loss_fn", batch_loss_fn)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name}: `{field}` must be callable, got {type(fn).__name__}.")
        self.test, self.eta, self.theta, self.nu = test, float(eta), float(theta), float(nu)
        self.noise_scale_factor = float(noise_scale_factor)
        self.test_interval = test_interval
        self.min_batch_size, self.max_batch_size = min_batch_size, max_batch_size
        self.max_growth_factor = None if max_growth_factor is None else float(max_growth_factor)
        self.allow_shrink = allow_shrink
        self.max_per_device_batch_size = max_per_device_batch_size
        self.lr_scaling = lr_scaling
        self.variance_estimator = variance_estimator
        self.loss_fn = loss_fn
        self.batch_loss_fn = batch_loss_fn
        self.estimator = variance_estimator  # resolved at setup when "auto"
        self.dataset_size: int | None = None  # examples per epoch (the default bound), read from the train loader
        self._bound_warned = False
        self._probe_loss: BatchLossFn | None = None
        self.per_sample_max_examples = per_sample_max_examples
        self.smoothing = float(smoothing)
        self.seed = int(seed)
        self.log_every_n_steps = log_every_n_steps
        # -- state --
        self.controller = BatchSizeController(1)
        self.tracker = stats.GradientNoiseScale(beta=float(noise_ema_beta))
        self._emas = {k: stats.BiasCorrectedEMA(self.smoothing) for k in ("trace_cov", "grad_sq_norm", "inner_var")}
        self.global_batch_size = 0  # the real global batch (0 until training starts)
        self.target_batch_size = 0
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

    def _check_trainer(self, trainer: Trainer, pl_module: LightningModule) -> None:
        name = type(self).__name__
        if not pl_module.automatic_optimization:
            raise RuntimeError(f"{name}: needs automatic optimization (`automatic_optimization=True`).")
        if trainer.strategy.handles_gradient_accumulation:
            raise RuntimeError(f"{name}: the strategy accumulates gradients itself; use a DDP-type strategy.")
        if any(isinstance(cb, GradientAccumulationScheduler) for cb in trainer.callbacks):
            raise RuntimeError(
                f"{name}: cannot be combined with `GradientAccumulationScheduler`: both set `accumulate_grad_batches`."
            )
        if self.estimator == "microbatch" and trainer.accumulate_grad_batches * trainer.world_size < 2:
            raise ValueError(
                f"{name}: `variance_estimator='microbatch'` needs >= 2 gradient samples per step: set "
                f"`accumulate_grad_batches` >= 2 or use >= 2 devices, or use `variance_estimator='per_sample'`; got "
                f"accumulate_grad_batches={trainer.accumulate_grad_batches} on {trainer.world_size} device(s)."
            )
        if self.max_per_device_batch_size is not None and trainer.reload_dataloaders_every_n_epochs != 1:
            raise ValueError(
                f"{name}: `max_per_device_batch_size` needs `Trainer(reload_dataloaders_every_n_epochs=1)` so "
                f"Lightning recounts the batches after a resize; got {trainer.reload_dataloaders_every_n_epochs}."
            )

    def _batch_loss(self, pl_module: LightningModule) -> BatchLossFn | None:
        output_loss = self.loss_fn if self.loss_fn is not None else getattr(pl_module, "per_sample_loss", None)
        return probe_loss(type(self).__name__, self.batch_loss_fn, output_loss)

    def _install_sampler(self, loader: DataLoader) -> DataLoader:
        """The DataLoader transform: the same loader, batched by a ResizableBatchSampler on our controller."""
        try:
            self.dataset_size = len(loader.dataset)  # type: ignore[arg-type]
        except TypeError:
            self.dataset_size = None
        if loader.batch_size is None or type(loader.batch_sampler) is not BatchSampler:
            raise TypeError(
                f"{type(self).__name__}: the train DataLoader must use `batch_size` (not a custom `batch_sampler`) so "
                f"its batches can be resized; got batch_sampler {type(loader.batch_sampler).__name__}."
            )
        if not self._controller_ready and not self._restored:
            self.controller.set_batch_size(int(loader.batch_size))
        self._controller_ready = True
        inner = loader.sampler
        if isinstance(inner, RandomSampler) and not inner.replacement and inner._num_samples is None:
            inner = EpochShuffleSampler(loader.dataset, seed=self.seed)
        batch_sampler = ResizableBatchSampler(inner, self.controller.batch_size, loader.drop_last, self.controller)
        return rebuild_dataloader(loader, batch_sampler=batch_sampler)

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

    def _end_epoch(self, trainer: Trainer, epoch: int) -> None:
        # The next epoch starts with batch_idx 0: any accumulation fits, and the per-device batch may change (then
        # re-plan even at an unchanged target, to trade accumulation for a larger per-device batch).
        self.last_epoch_ended = epoch
        resize = self.max_per_device_batch_size is not None
        if resize or self.target_batch_size != self.global_batch_size or self.pending_accumulation is not None:
            self._replan(trainer, resize_device=resize, apply_now=True)

    def _resume_position(self, trainer: Trainer) -> None:
        """After a restore, line the sampler position and the epoch-end re-plan up with where Lightning resumes.

        Lightning resumes a checkpoint written at the last batch's end, or in ``on_train_epoch_end`` before this
        callback's hook, in the next epoch without calling ``on_train_epoch_end`` for the finished one: the re-plan the
        uninterrupted run made there is made now. (After a checkpoint written during the epoch-end validation
        Lightning resumes in the same epoch and calls ``on_train_epoch_end`` itself.) A position saved in an epoch
        Lightning has moved past (``limit_train_batches`` ended it early) is dropped.
        """
        self.controller.start_epoch(trainer.current_epoch)
        if self.last_epoch_ended < trainer.current_epoch - 1:
            self._end_epoch(trainer, trainer.current_epoch - 1)

    # -- per step ---------------------------------------------------------------------------------------------
    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        n = _batch_size(batch)
        self.controller.consume(n)
        self.samples_seen_total += n * trainer.world_size
        self._step_at_batch_start = trainer.global_step
        self._samples.begin_batch(batch, n, capturing=trainer.global_step % self.test_interval == 0)

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
            all_reduce=_all_reduce if trainer.world_size > 1 else None,
            pl_module=pl_module,
            loss_fn=self._probe_loss,
            global_batch=self.global_batch_size,
        )

    def _demand(self, s: stats.SampleGradStats) -> float:
        self.tracker.update(stats.noise_estimate(s))
        if self.smoothing > 0:
            sm = {k: ema.update(getattr(s, k)) for k, ema in self._emas.items()}
            s = stats.SampleGradStats(count=s.count, **sm)
        if self.test == "norm":
            return stats.norm_test_batch_size(s, self.eta)
        if self.test == "inner_product":
            return stats.inner_product_test_batch_size(s, self.theta)
        if self.test == "augmented":
            return stats.augmented_test_batch_size(s, self.theta, self.nu)
        b_simple = self.tracker.noise_scale
        if math.isnan(b_simple):
            return math.nan
        return math.inf if math.isinf(b_simple) else float(max(math.ceil(self.noise_scale_factor * b_simple), 1))

    def _replan(self, trainer: Trainer, resize_device: bool, apply_now: bool) -> None:
        per_device, k = plan_batch(
            self.target_batch_size, trainer.world_size, self.controller.batch_size, self.accumulation,
            self.max_per_device_batch_size, self._max_batch(), resize_device,
            min_accumulation=2 if self.estimator == "microbatch" and trainer.world_size == 1 else 1,
        )
        if not self.allow_shrink and per_device * k * trainer.world_size < self.global_batch_size:
            return  # rounding down (at max_batch_size) must not shrink a batch that may not shrink
        if apply_now:
            self.pending_accumulation = None
            self._set_batch(trainer, per_device, k)
        elif k != self.accumulation:
            self.pending_accumulation = k
        else:
            self.pending_accumulation = None

    def _max_batch(self) -> int | None:
        """``max_batch_size``, or by default one epoch of the training set (``None`` only without a length)."""
        if self.max_batch_size is not None:
            return self.max_batch_size
        if self.dataset_size is None:
            return None
        return max(self.dataset_size, self.min_batch_size or 1, self.global_batch_size)

    def _warn_if_bounded(self, demanded: float) -> None:
        bound = self._max_batch()  # an explicit `max_batch_size` is the user's b_max: only the default warns
        if self._bound_warned or self.max_batch_size is not None or bound is None or not demanded > bound:
            return
        self._bound_warned = True
        rank_zero_warn(
            f"{type(self).__name__}: the {self.test} test demands a global batch of {demanded:.4g}, above one epoch "
            f"of the training set ({bound} examples, the default bound); the batch stays there. The gradient is "
            "noise-dominated: set `max_batch_size`, lower the learning rate, or raise `eta`/`theta` to grow less."
        )

    def _set_batch(self, trainer: Trainer, per_device: int, accumulation: int) -> None:
        new = per_device * trainer.world_size * accumulation
        old = self.global_batch_size
        if per_device != self.controller.batch_size:
            self.controller.set_batch_size(per_device)
        trainer.accumulate_grad_batches = accumulation
        self.accumulation = accumulation
        self.global_batch_size = new
        if self.pending_accumulation == accumulation:
            self.pending_accumulation = None
        if old > 0 and new != old and self.lr_scaling != "none":
            ratio = new / old if self.lr_scaling == "linear" else math.sqrt(new / old)
            _scale_lrs(trainer, ratio)

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


def _all_reduce(t: Tensor) -> None:
    torch.distributed.all_reduce(t)


def _scale_lrs(trainer: Trainer, ratio: float) -> None:
    """Multiply every param group's lr (and ``initial_lr``) and every scheduler's ``base_lrs`` by ``ratio``."""
    for optimizer in trainer.optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * ratio
            if "initial_lr" in group:
                group["initial_lr"] = group["initial_lr"] * ratio
    for config in trainer.lr_scheduler_configs:
        base = getattr(config.scheduler, "base_lrs", None)
        if base is not None:
            config.scheduler.base_lrs = [lr * ratio for lr in base]
