"""GradES as a Lightning callback: freeze converged weight matrices, stop when enough of them are frozen."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override

from lightning_convergence import stats
from lightning_convergence._checks import check_choice, check_int, check_int_at_least, check_state_version
from lightning_convergence._metrics import log_metrics, should_log
from lightning_convergence._nonfinite import act_on_nonfinite, check_nonfinite_policy
from lightning_convergence.callbacks._common import handle_nonfinite
from lightning_convergence.stopping.grades import GradES, validate_grades_args

__all__ = ["GradientEarlyStopping", "FREEZE_MODES"]

FREEZE_MODES = ("auto", "requires_grad", "drop_grad")
MEASURE_AT = ("after_step", "before_step")


class GradientEarlyStopping(Callback):
    """Freeze each weight matrix once its L1 convergence signal falls below τ after a grace period (GradES), and
    stop training when a chosen share of matrices is frozen.

    Paper: Wen et al. *GradES: Significantly Faster Training in Transformers with Gradient-Based Early Stopping.*
    arXiv:2509.01842, 2025; official code ``IXZZZ9/GradES``. Rule: see :class:`~lightning_convergence.stopping.GradES`.

    How freezing stays exact: at every optimizer step, in ``on_before_optimizer_step`` (after DDP's all-reduce and
    accumulation, before gradient clipping and ``optimizer.step``), the ``.grad`` of every frozen matrix is set to
    ``None``. PyTorch optimizers skip parameters without a gradient entirely, so frozen matrices receive no update,
    no momentum or Adam-moment step and no (decoupled) weight decay, with any optimizer that follows that convention.
    On top of that, ``freeze_mode`` chooses whether frozen matrices also stop *computing* weight gradients:

    * ``"requires_grad"``: ``requires_grad=False``, so backward skips their weight gradients (real compute saved:
      about a third of a linear layer's training FLOPs). Under DDP this needs ``find_unused_parameters=True`` (and
      no ``static_graph``): DDP's reducer otherwise waits for gradients that never come.
    * ``"drop_grad"``: gradients are still computed (and all-reduced) and then dropped. Always safe; saves nothing.
    * ``"auto"`` (default): ``"requires_grad"`` except under a DDP model without ``find_unused_parameters`` or with
      ``static_graph``, where it picks ``"drop_grad"`` and says so once.

    When the signal is measured (``measure_at``): ``"after_step"`` (default, the official code's ``on_step_end``)
    measures in ``on_train_batch_end`` right after optimizer step ``s`` (``s`` = steps completed, checks at
    ``s % check_every_n_steps == 0``): the weight change includes step ``s``'s update, the gradient signal is the
    gradient step ``s`` just applied, and a matrix frozen at check ``s`` receives no update from step ``s + 1`` on.
    ``"before_step"`` measures in ``on_before_optimizer_step`` of step ``s + 1``: the gradient that falls below τ
    is itself dropped (one update earlier), and the first weight-change reference is the initial weights.

    Deviations: ``signal``, ``reduction`` and ``patience`` generalise the code (see the core). Signals are averaged
    across ranks before deciding, so every rank freezes the same matrices at the same step.

    Args:
        tau: τ, the freezing threshold on the signal, > 0. Default ``1e-3`` (per entry, with ``reduction="mean"``:
            triggers on the converged models of the test zoo; the code's ``1e-4`` is a summed LLM fine-tuning
            value). Pick it from ``convergence/stop/signal_median`` of a reference run (see the card).
        grace_fraction: α, the share of the total steps before anything freezes, in [0, 1). Default ``0.3`` (code).
        max_frozen_ratio: stop once this share of the tracked matrices is frozen, in (0, 1]. Default ``1.0``.
        signal: ``"weight_change"`` (L1 norm of the weight change between checks, the official code) or
            ``"grad"`` (L1 norm of the gradient, the paper's abstract). Default ``"weight_change"``. The weight
            change keeps a copy of every tracked, unfrozen matrix (memory and checkpoint size grow by that much);
            with Adam-type optimizers it does not shrink with the gradient, so prefer ``"grad"`` there.
        reduction: ``"sum"`` (paper/code) or ``"mean"`` (divide by the matrix size: one τ for all shapes).
            Default ``"mean"``.
        patience: consecutive checks below τ needed to freeze a matrix, ≥ 1. Default ``1`` (code).
        check_every_n_steps: check every this many optimizer steps, ≥ 1. Default ``1`` (code's ``compute_interval``).
        include: regular expressions (``re.search``) selecting the tracked parameters by name, e.g.
            ``["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]`` for the paper's
            transformer components. Default ``None``: every parameter with at least ``min_ndim`` dimensions.
        exclude: regular expressions removing parameters from the selection. Default ``None``.
        min_ndim: minimum dimensions of a tracked parameter, ≥ 1. Default ``2`` (matrices; biases and norms stay
            trainable).
        freeze_mode: ``"auto"``, ``"requires_grad"`` or ``"drop_grad"`` (see above). Default ``"auto"``.
        measure_at: ``"after_step"`` (official code) or ``"before_step"`` (see above). Default ``"after_step"``.
        total_steps: T, the step budget α refers to, ≥ 1. Default ``None``: ``trainer.estimated_stepping_batches``.
        stop_training: stop when ``max_frozen_ratio`` is reached. Default ``True``; ``False`` only freezes.
        log_per_item: also log each matrix's last signal. Default ``False``.
        on_nonfinite: ``"stop"`` (default) or ``"skip"``: the shared non-finite policy
            (``lightning_convergence._nonfinite``) for a non-finite signal; that step is not applied and no matrix
            freezes on it.

    State: the frozen matrices (name → step), per-matrix streaks and last signals, the weight-change reference
    copies, the stop step, ``version``. The frozen set is re-applied when a checkpoint is resumed.

    Logs: ``convergence/stop/frozen_fraction``, ``convergence/stop/frozen_total``,
    ``convergence/stop/frozen_numel_total``, ``convergence/stop/nonfinite_skipped_total``,
    ``convergence/stop/signal_max`` and ``convergence/stop/signal_median`` (over the matrices not yet frozen, at
    their last check: pick ``tau`` from these, e.g. the median reached late in a reference run), and with
    ``log_per_item`` ``convergence/stop/signal/<param>``.

    Raises:
        ValueError: for ``tau`` ≤ 0, ``grace_fraction`` outside [0, 1), ``max_frozen_ratio`` outside (0, 1], an
            unknown ``signal``, ``reduction`` or ``freeze_mode``, ``patience``/``check_every_n_steps``/``min_ndim`` < 1,
            ``total_steps`` < 1, or an invalid regular expression.
        RuntimeError: at setup, under manual optimization, when no parameter matches, when the step budget is
            unknown (set ``max_steps`` or ``total_steps``), or for ``freeze_mode="requires_grad"`` under DDP without
            ``find_unused_parameters=True``.

    Example::

        Trainer(max_steps=10_000, callbacks=[GradientEarlyStopping(tau=1e-3, grace_fraction=0.3, reduction="mean")])
    """

    STATE_VERSION = 1

    def __init__(
        self,
        tau: float = 1e-3,
        grace_fraction: float = 0.3,
        max_frozen_ratio: float = 1.0,
        signal: str = "weight_change",
        reduction: str = "mean",
        patience: int = 1,
        check_every_n_steps: int = 1,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        min_ndim: int = 2,
        freeze_mode: str = "auto",
        measure_at: str = "after_step",
        total_steps: int | None = None,
        stop_training: bool = True,
        log_per_item: bool = False,
        on_nonfinite: str = "stop",
    ) -> None:
        name = type(self).__name__
        self.on_nonfinite = check_nonfinite_policy(name, on_nonfinite)
        self._nonfinite_warned = False
        validate_grades_args(name, tau, grace_fraction, max_frozen_ratio, signal, reduction, patience)
        for field, value in (("check_every_n_steps", check_every_n_steps), ("min_ndim", min_ndim)):
            check_int_at_least(name, field, value, 1)
        check_int(name, "total_steps", total_steps, 1, optional=True)
        check_choice(name, "freeze_mode", freeze_mode, FREEZE_MODES)
        check_choice(name, "measure_at", measure_at, MEASURE_AT)
        self.measure_at = measure_at
        self._step_at_batch_start = -1
        self._skip_next_measure = False
        self._include = _compile(name, "include", include)
        self._exclude = _compile(name, "exclude", exclude)
        self.tau, self.grace_fraction, self.max_frozen_ratio = float(tau), float(grace_fraction), max_frozen_ratio
        self.signal, self.reduction, self.patience = signal, reduction, patience
        self.check_every_n_steps, self.min_ndim, self.freeze_mode = check_every_n_steps, min_ndim, freeze_mode
        self.total_steps, self.stop_training, self.log_per_item = total_steps, stop_training, log_per_item
        self.core: GradES | None = None
        self.resolved_mode: str | None = None
        self.stopped_step: int | None = None
        self.nonfinite_skipped_total = 0
        self._params: dict[str, torch.nn.Parameter] = {}
        self._module: torch.nn.Module | None = None
        self._pending_state: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(tau=self.tau, signal=self.signal, reduction=self.reduction)

    @property
    def frozen_names(self) -> list[str]:
        return [] if self.core is None else list(self.core.frozen)

    @property
    def frozen_numel(self) -> int:
        """Entries in frozen matrices (for compute accounting)."""
        return sum(self._params[n].numel() for n in self.frozen_names)

    # -- hooks ------------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise RuntimeError(
                f"{type(self).__name__} needs automatic optimization (it drops frozen gradients in "
                "`on_before_optimizer_step`); the LightningModule sets `automatic_optimization=False`."
            )
        self._module = pl_module
        self._params = {n: p for n, p in pl_module.named_parameters() if self._selected(n, p)}
        if not self._params:
            raise RuntimeError(
                f"{type(self).__name__}: no parameter matches `include`={self._patterns(self._include)}, "
                f"`exclude`={self._patterns(self._exclude)}, `min_ndim`={self.min_ndim}."
            )

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        total = self.total_steps if self.total_steps is not None else trainer.estimated_stepping_batches
        if not math.isfinite(float(total)):
            raise RuntimeError(
                f"{type(self).__name__}: the step budget is unknown (max_steps=-1 and max_epochs=-1): set the "
                "Trainer's `max_steps` or this callback's `total_steps`."
            )
        self.core = GradES(list(self._params), self.tau, self.grace_fraction, int(total), self.max_frozen_ratio,
                           self.signal, self.reduction, self.patience)
        self.resolved_mode = self._resolve_mode(trainer)
        if self._pending_state is not None:
            self.core.load_state_dict(self._pending_state["core"])
            self.stopped_step = self._pending_state["stopped_step"]
            self.nonfinite_skipped_total = int(self._pending_state["nonfinite_skipped_total"])
            self._pending_state = None
            self._freeze(self.core.frozen)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._step_at_batch_start = trainer.global_step

    @override
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        core = self.core
        if core is None:
            return
        if self.measure_at == "before_step":
            self._check(trainer, core, trainer.global_step, before_update=True)
        elif (trainer.global_step + 1) % self.check_every_n_steps == 0 and core.active:
            # The after-step check of this step: a non-finite gradient never reaches the weights (policy first).
            self._skip_next_measure = self._nonfinite_grads(trainer)
        self._drop_frozen_grads()

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        core = self.core
        if core is None or self.measure_at != "after_step" or trainer.global_step == self._step_at_batch_start:
            return  # no optimizer step in this batch (accumulating)
        skip, self._skip_next_measure = self._skip_next_measure, False
        self._check(trainer, core, trainer.global_step, before_update=False, skip=skip)

    def _check(self, trainer: Trainer, core: GradES, step: int, before_update: bool, skip: bool = False) -> None:
        """One check at step ``step`` (steps completed when it is measured): measure, decide, freeze, stop, log."""
        if step % self.check_every_n_steps != 0:
            if should_log(trainer):
                self._log(trainer, core)
            return
        if core.active and not skip:
            bad = before_update and self._nonfinite_grads(trainer)
            signals = None if bad else self._measure(trainer, core)
            if signals is not None and not bool(torch.isfinite(signals).all()):
                self._nonfinite_warned = self._report_nonfinite(trainer, "signal")
                signals = None
            newly = core.decide(step, signals)
            self._freeze(newly, keep_going=self._keeps_training(trainer, core))
        if self.stop_training and trainer.strategy.reduce_boolean_decision(core.should_stop, all=False):
            if self.stopped_step is None:
                self.stopped_step = step
                rank_zero_info(
                    f"{type(self).__name__}: {len(core.frozen)}/{len(core.names)} matrices frozen "
                    f"(>= max_frozen_ratio={self.max_frozen_ratio}) at step {step}; stopping."
                )
            trainer.should_stop = True
        if should_log(trainer):
            self._log(trainer, core)

    def _nonfinite_grads(self, trainer: Trainer) -> bool:
        """Global finding of non-finite gradients among the tracked matrices, with the shared policy applied (the
        step is then not applied: every gradient is dropped)."""
        grads = [p.grad for p in self._params.values() if p.grad is not None]
        found = bool(grads) and not stats.all_finite(grads)
        found, self._nonfinite_warned = handle_nonfinite(trainer, self._module, type(self).__name__,
                                                         self.on_nonfinite, found, self._nonfinite_warned)
        if found:
            self.nonfinite_skipped_total += 1
        return found

    def _report_nonfinite(self, trainer: Trainer, what: str) -> bool:
        self.nonfinite_skipped_total += 1
        return act_on_nonfinite(trainer, type(self).__name__, self.on_nonfinite, what, warned=self._nonfinite_warned)

    # -- internals --------------------------------------------------------------------------------------------
    def _selected(self, name: str, p: torch.nn.Parameter) -> bool:
        if not p.requires_grad or p.ndim < self.min_ndim:
            return False
        if self._include and not any(r.search(name) for r in self._include):
            return False
        return not any(r.search(name) for r in self._exclude)

    def _resolve_mode(self, trainer: Trainer) -> str:
        model = trainer.strategy.model
        if not isinstance(model, DistributedDataParallel):
            return "drop_grad" if self.freeze_mode == "drop_grad" else "requires_grad"
        ddp_ok = bool(model.find_unused_parameters) and not bool(getattr(model, "static_graph", False))
        if self.freeze_mode == "requires_grad" and not ddp_ok:
            raise RuntimeError(
                f"{type(self).__name__}: `freeze_mode`='requires_grad' under DDP needs "
                "`DDPStrategy(find_unused_parameters=True)` without `static_graph`; use that, or `freeze_mode`="
                "'drop_grad' (or 'auto')."
            )
        if self.freeze_mode == "auto" and not ddp_ok:
            rank_zero_info(
                f"{type(self).__name__}: `freeze_mode`='auto' picked 'drop_grad' (DDP without "
                "find_unused_parameters=True): frozen matrices get no updates but their gradients are still computed."
            )
            return "drop_grad"
        return self.freeze_mode if self.freeze_mode != "auto" else "requires_grad"

    def _measure(self, trainer: Trainer, core: GradES) -> Tensor | None:
        params = [self._params[n] for n in core.active]
        if self.signal == "grad":
            tensors = [p.grad if p.grad is not None else torch.full_like(p, math.nan) for p in params]
        else:
            tensors = [p.detach() for p in params]
        signals = core.measure(tensors)
        if signals is None:
            return None
        if trainer.world_size > 1:
            signals = trainer.strategy.reduce(signals, reduce_op="mean")
        return signals

    def _freeze(self, names: Sequence[str], keep_going: bool = True) -> None:
        for n in names:
            self._params[n].grad = None
        if self.resolved_mode != "requires_grad" or not names:
            return
        for n in names:
            self._params[n].requires_grad_(False)
        if keep_going and self._module is not None and not any(p.requires_grad for p in self._module.parameters()):
            # Nothing would require grad and the next backward would raise: training goes on only when stopping
            # is off or Lightning's min_steps/min_epochs outlast the stop. Keep these frozen by dropping grads.
            for n in names:
                self._params[n].requires_grad_(True)
            rank_zero_warn(
                f"{type(self).__name__}: every parameter is frozen but training continues (`stop_training`=False "
                "or the Trainer's min_steps/min_epochs); the last matrices keep requires_grad=True and are frozen "
                "by dropping their gradients."
            )

    def _keeps_training(self, trainer: Trainer, core: GradES) -> bool:
        """Whether training may continue after this step (so at least one parameter must still require grad)."""
        if not self.stop_training or not core.should_stop:
            return True
        min_steps = trainer.fit_loop.min_steps or 0
        min_epochs = trainer.fit_loop.min_epochs or 0
        done = trainer.global_step + (1 if self.measure_at == "before_step" else 0)  # steps done once this one is
        return done < min_steps or trainer.current_epoch + 1 < min_epochs

    def _drop_frozen_grads(self) -> None:
        for n in self.frozen_names:
            self._params[n].grad = None

    def _log(self, trainer: Trainer, core: GradES) -> None:
        metrics: dict[str, float] = {
            "frozen_fraction": core.frozen_fraction,
            "frozen_total": float(len(core.frozen)),
            "frozen_numel_total": float(self.frozen_numel),
            "nonfinite_skipped_total": float(self.nonfinite_skipped_total),
        }
        unfrozen = sorted(v for n, v in core.last_signal.items() if n not in core.frozen and math.isfinite(v))
        if unfrozen:
            metrics["signal_max"] = unfrozen[-1]
            metrics["signal_median"] = unfrozen[len(unfrozen) // 2]
        if self.log_per_item:
            metrics.update({f"signal/{n}": v for n, v in core.last_signal.items() if math.isfinite(v)})
        log_metrics(trainer, "stop", metrics)

    @staticmethod
    def _patterns(compiled: list[re.Pattern[str]]) -> list[str]:
        return [r.pattern for r in compiled]

    # -- state ------------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        if self.core is None:
            return {} if self._pending_state is None else dict(self._pending_state)
        return {
            "version": self.STATE_VERSION,
            "core": self.core.state_dict(),
            "stopped_step": self.stopped_step,
            "nonfinite_skipped_total": self.nonfinite_skipped_total,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        check_state_version(type(self).__name__, state_dict, self.STATE_VERSION)
        # Applied in on_fit_start, once the matrices are known and DDP has wrapped the model.
        self._pending_state = dict(state_dict)


def _compile(owner: str, field: str, patterns: Sequence[str] | None) -> list[re.Pattern[str]]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    out = []
    for pat in patterns:
        try:
            out.append(re.compile(pat))
        except (re.error, TypeError) as err:
            raise ValueError(f"{owner}: `{field}` entries must be regular expressions, got {pat!r} ({err}).") from err
    return out
