"""Switch schedule-free optimizers between training (y) and evaluation (x) weights at the right Lightning hooks."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override

__all__ = ["ScheduleFreeModeSwitch"]


class ScheduleFreeModeSwitch(Callback):
    """Call ``optimizer.train()`` / ``optimizer.eval()`` for schedule-free optimizers (Lightning issue #20441).

    Paper: Defazio, Yang, Mehta, Mishchenko, Khaled, Cutkosky. *The Road Less Scheduled.* NeurIPS 2024,
    arXiv:2405.15682. Schedule-free optimizers (package ``schedulefree``: ``AdamWScheduleFree``,
    ``SGDScheduleFree``, ...) keep the model's parameters at the gradient point ``y`` while training and must be
    switched to the averaged point ``x`` for evaluation and saving; their docs require ``optimizer.train()`` before
    training steps and ``optimizer.eval()`` before evaluation and checkpointing.

    When each is called:

    - ``train()``: at train start (after a checkpoint is restored), at every training-epoch and training-batch
      start (a no-op when already training; a run resumed mid-epoch skips ``on_train_epoch_start``), and after each
      validation run during ``fit`` (so mid-epoch validation with ``val_check_interval`` resumes on ``y``).
    - ``eval()``: before validation (including the sanity check), test and predict, and at the end of training (the
      module left in memory after ``fit`` holds the ``x`` weights, ready for export or ``trainer.test``). A
      ``validate``/``test``/``predict`` call after ``fit`` attaches no optimizer, so the callback keeps the
      optimizers it saw during ``fit`` and switches those.
    - **Checkpoints hold the eval weights** (decision): in ``on_save_checkpoint`` the optimizer is switched to eval,
      the checkpoint's ``state_dict`` and ``optimizer_states`` are replaced by copies taken in eval mode, and the
      optimizer is switched back. A checkpoint is therefore a usable model on its own (``load_from_checkpoint``
      gives ``x``), and resuming restores ``train_mode=False`` so the next ``train()`` recomputes ``y`` from
      ``x`` and ``z``. Cost: one copy of the model weights while saving. Resume is exact up to float rounding of
      the ``y -> x -> y`` interpolation (about 1 ulp per parameter).

    Deviations: BatchNorm statistics are not recomputed for ``x`` (schedule_free's docs suggest a few forward passes
    in train mode after ``eval()`` for BN models). Sharded strategies (FSDP, DeepSpeed) are not supported by the
    checkpoint rewrite (single device and DDP are).

    Args: none.

    State: none (the mode lives in the optimizer's ``param_groups``, which the checkpoint holds).

    Raises:
        TypeError: at fit start, if an optimizer has no callable ``train``/``eval`` (e.g. plain ``torch.optim.AdamW``).

    Example::

        # pip install 'lightning-convergence[optim]'  (schedulefree)
        Trainer(callbacks=[ScheduleFreeModeSwitch()])   # model.configure_optimizers returns AdamWScheduleFree
    """

    def __init__(self) -> None:
        self._fit_optimizers: list[torch.optim.Optimizer] = []

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._fit_optimizers = list(trainer.optimizers)
        for opt in trainer.optimizers:
            if not (callable(getattr(opt, "train", None)) and callable(getattr(opt, "eval", None))):
                raise TypeError(
                    f"ScheduleFreeModeSwitch: the optimizer must be schedule-free (have `train()` and `eval()`), got "
                    f"{type(opt).__name__}. Use e.g. schedulefree.AdamWScheduleFree, or remove this callback."
                )

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._set(trainer, train=True)

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._set(trainer, train=True)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        # A no-op loop over the param groups when already training; it covers every path into a training step
        # (a run resumed mid-epoch skips ``on_train_epoch_start``).
        self._set(trainer, train=True)

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._set(trainer, train=False)

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self._set(trainer, train=True)

    @override
    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._set(trainer, train=False)

    @override
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._set(trainer, train=False)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._set(trainer, train=False)

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        training = [opt for opt in trainer.optimizers if _in_train_mode(opt)]
        if not training:
            return
        for opt in training:
            opt.eval()
        checkpoint["state_dict"] = {
            k: v.detach().clone() if isinstance(v, torch.Tensor) else v
            for k, v in trainer.strategy.lightning_module_state_dict().items()
        }
        if "optimizer_states" in checkpoint:
            checkpoint["optimizer_states"] = [trainer.strategy.optimizer_state(opt) for opt in trainer.optimizers]
        for opt in training:
            opt.train()

    def _set(self, trainer: Trainer, train: bool) -> None:
        # ``trainer.validate/test/predict`` after ``fit`` attach no optimizer: use the ones seen during fit.
        for opt in trainer.optimizers or self._fit_optimizers:
            fn = getattr(opt, "train" if train else "eval", None)
            if callable(fn):
                fn()


def _in_train_mode(opt: torch.optim.Optimizer) -> bool:
    """schedule_free keeps ``train_mode`` in every param group; an optimizer without it is treated as training."""
    return bool(opt.param_groups[0].get("train_mode", True)) if opt.param_groups else False
