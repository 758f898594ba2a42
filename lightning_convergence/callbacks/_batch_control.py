"""The batch-control half of :class:`~lightning_convergence.callbacks.AdaptiveBatchSize` (private): owning the train
loader's batching, turning a target global batch into ``(per_device, accumulation)`` through
:func:`~lightning_convergence.data.batch_plan.plan_batch`, and applying it at the points Lightning allows."""

from __future__ import annotations

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

from lightning_convergence._checks import argument_error
from lightning_convergence.data import rebuild_dataloader
from lightning_convergence.data.batch_plan import lr_scale_ratio, plan_batch, scale_lrs
from lightning_convergence.data.resizable import BatchSizeController, EpochShuffleSampler, ResizableBatchSampler

__all__ = ["BatchControl"]


class BatchControl:
    """Mixin: the global batch, its target and plan. The host class sets the attributes read here in ``__init__``."""

    controller: BatchSizeController
    global_batch_size: int
    target_batch_size: int
    accumulation: int
    pending_accumulation: int | None
    last_epoch_ended: int
    dataset_size: int | None
    min_batch_size: int | None
    max_batch_size: int | None
    max_per_device_batch_size: int | None
    allow_shrink: bool
    lr_scaling: str
    estimator: str
    seed: int
    test: str
    _bound_warned: bool
    _controller_ready: bool
    _restored: bool

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
        ratio = lr_scale_ratio(old, new, self.lr_scaling)
        if ratio != 1.0:
            scale_lrs(trainer.optimizers, [c.scheduler for c in trainer.lr_scheduler_configs], ratio)

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
            raise argument_error(
                name, "variance_estimator", "'per_sample' with fewer than 2 gradient samples per step "
                f"(accumulate_grad_batches={trainer.accumulate_grad_batches} on {trainer.world_size} device(s))",
                "microbatch", hint="Or set `accumulate_grad_batches` >= 2 or use >= 2 devices.")
        if self.max_per_device_batch_size is not None and trainer.reload_dataloaders_every_n_epochs != 1:
            raise argument_error(
                name, "max_per_device_batch_size", "None unless `Trainer(reload_dataloaders_every_n_epochs=1)` (so "
                "Lightning recounts the batches after a resize); reload_dataloaders_every_n_epochs is "
                f"{trainer.reload_dataloaders_every_n_epochs}", self.max_per_device_batch_size)
