"""Statistical early stopping: stop when the gradient is below the dataset's noise, or when the fitted loss curve
predicts too little further improvement."""

from __future__ import annotations

import math
from enum import Enum
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.optim.lr_scheduler import ReduceLROnPlateau
from typing_extensions import override

from lightning_convergence import stats
from lightning_convergence._checks import (
    argument_error,
    check_choice,
    check_int,
    check_int_at_least,
    check_number,
    check_state_version,
)
from lightning_convergence._metrics import log_metrics
from lightning_convergence._nonfinite import act_on_nonfinite, check_nonfinite_policy
from lightning_convergence.callbacks._common import handle_nonfinite, hook_loss_factor
from lightning_convergence.callbacks.grad_stats_monitor import GradientStatsMonitor
from lightning_convergence.stopping.loss_curve import LossCurveRule, validate_curve_args
from lightning_convergence.stopping.lr_forecast import forecast_lrs
from lightning_convergence.stopping.statistical import NoiseDominatedRule, validate_noise_args

__all__ = ["ConvergenceEarlyStopping", "ConvergenceStopReason", "RULES", "FUTURE_LR"]

RULES = ("noise_dominated", "loss_curve")
FUTURE_LR = ("scheduler", "constant")


class ConvergenceStopReason(Enum):
    """Why :class:`ConvergenceEarlyStopping` stopped (``NOT_STOPPED`` while training goes on)."""

    NOT_STOPPED = "not_stopped"
    NOISE_DOMINATED = "noise_dominated"
    LOSS_CURVE = "loss_curve"


class ConvergenceEarlyStopping(Callback):
    """Stop training on statistical evidence of convergence instead of metric patience.

    Two rules, either or both (the first to fire stops training):

    * ``"noise_dominated"``: the AdAdaGrad norm test demands a batch larger than the dataset, ``tr(Σ)/(η²‖g‖²) > N``
      (``‖g‖²`` by an upper confidence bound over a window), for ``patience`` checks
      (:class:`~lightning_convergence.stopping.NoiseDominatedRule`). Statistics from micro-batch and per-rank
      gradients (an internal :class:`GradientStatsMonitor` that logs nothing), or on one device without accumulation
      per-example gradients of up to 64 examples of the check step's batch (said once).
    * ``"loss_curve"``: the LR-annealing scaling law ``L = L0 + A·S1^(−α) − C·S2``, fitted online to the training
      loss, predicts less than ``min_delta`` improvement by the end of the budget under the current LR schedule
      (:class:`~lightning_convergence.stopping.LossCurveRule`; future rates from
      :func:`~lightning_convergence.stopping.forecast_lrs`), for ``patience`` checks.

    Papers: Lau, Liu, Kolar. *AdAdaGrad: Adaptive Batch Size Schemes for Adaptive Gradient Methods.*
    arXiv:2402.11215, 2024 (norm test). McCandlish, Kaplan, Amodei. *An Empirical Model of Large-Batch Training.*
    arXiv:1812.06162, 2018 (estimator). Tissue, Wang, Wang, Liu, Liu. *Scaling Law with Learning Rate Annealing.*
    arXiv:2408.11029, 2024 (loss curve).

    Deviations: the norm test is used as a stopping rule, not to grow the batch; its statistics are micro-batch /
    per-rank estimates, not exact per-example gradients. The scaling law is fitted online by least squares on the
    training loss averaged over each check interval (paired with the LR areas at the interval's end), not offline
    with a Huber loss. Future rates: a copy of the first LR scheduler (``ReduceLROnPlateau`` counts as constant) or
    the current rate (``future_lr="constant"``), of the first param group.

    Args:
        rules: which rules may stop training, a non-empty subset of ``("noise_dominated", "loss_curve")``. Default
            both (the first to fire stops).
        check_every_n_steps: check every this many optimizer steps, ≥ 1. Default ``10``.
        patience: consecutive firing checks before stopping (each rule counts its own), ≥ 1. Default ``3``.
        min_step: never stop before this optimizer step, ≥ 0. Default ``0``.
        eta: η of the norm test, > 0. Default ``1.0`` (gradient norm below the standard error of the dataset-mean
            gradient). Smaller values stop earlier: the rule fires once the noise scale exceeds η²·N.
        dataset_size: N, training examples per epoch over all ranks, ≥ 2. Default ``None``: the length of the
            training dataloader's dataset.
        window: noise measurements averaged by the norm test, ≥ 2. Default ``10`` (raise it with small
            micro-batches: one ``‖g‖²`` estimate near convergence is much noisier than ``tr(Σ)/N``).
        confidence_z: z of the upper bound ``mean + z·stderr`` of ``‖g‖²`` over the window, ≥ 0. Default ``2.0``.
        ema_beta: EMA factor of the ``tr(Σ)`` and ``‖g‖²`` estimates fed to the window, in [0, 1). Default ``0.0``
            (raw unbiased estimates; the window smooths; EMAs lag while the gradient shrinks, see the card).
        min_delta: the loss-curve rule stops when the predicted remaining improvement is below this, in loss
            units, ≥ 0. Default ``0.01``. Set it to the smallest gain worth the rest of the budget.
        min_points: checks recorded before the first loss-curve fit, ≥ 4. Default ``8``.
        future_lr: ``"scheduler"`` or ``"constant"`` (see Deviations). Default ``"scheduler"``.
        annealing_decay: λ, the momentum of the annealing area S2, in [0, 1). Default ``0.999`` (paper).
        verbose: print the stop reason on rank 0. Default ``True``.
        on_nonfinite: ``"stop"`` (default, as Lightning's ``EarlyStopping(check_finite=True)``) or ``"skip"``: what
            a non-finite gradient (at checks) or training loss does (the shared policy of
            ``lightning_convergence._nonfinite``; the step is not applied either way).

    State: both rules (incl. the loss-curve history of ``(step, S1, S2, loss)``), the noise-estimator EMAs, the
    stop step and reason, ``version``.

    Logs (at checks): ``convergence/stop/required_batch`` (norm test on the window means, ``tr Σ/(η²‖g‖²)``),
    ``convergence/stop/grad_sq_upper`` (upper bound of ``‖g‖²`` over the window),
    ``convergence/stop/noise_streak``, ``convergence/stop/predicted_improvement``,
    ``convergence/stop/predicted_final_loss``, ``convergence/stop/curve_streak``, ``convergence/stop/stopped``.

    Raises:
        ValueError: for a value out of its range or an unknown choice (the message names the field).
        RuntimeError: at fit start, for manual optimization, ``loss_curve`` with an unknown step budget
            (``max_steps=-1`` and ``max_epochs=-1``), or an unreadable dataset size (pass ``dataset_size``).

    Example::

        Trainer(accumulate_grad_batches=4, max_steps=5000,
                callbacks=[ConvergenceEarlyStopping(rules=["noise_dominated", "loss_curve"], min_delta=0.005)])
    """

    STATE_VERSION = 1

    def __init__(
        self,
        rules: tuple[str, ...] | list[str] = ("noise_dominated", "loss_curve"),
        check_every_n_steps: int = 10,
        patience: int = 3,
        min_step: int = 0,
        eta: float = 1.0,
        dataset_size: int | None = None,
        window: int = 10,
        confidence_z: float = 2.0,
        ema_beta: float = 0.0,
        min_delta: float = 0.01,
        min_points: int = 8,
        future_lr: str = "scheduler",
        annealing_decay: float = 0.999,
        verbose: bool = True,
        on_nonfinite: str = "stop",
    ) -> None:
        name = type(self).__name__
        rules = tuple([rules] if isinstance(rules, str) else rules)
        if not rules or any(r not in RULES for r in rules):
            raise argument_error(name, "rules", "a non-empty subset of 'noise_dominated', 'loss_curve'", list(rules))
        check_int_at_least(name, "check_every_n_steps", check_every_n_steps, 1)
        validate_noise_args(name, eta, patience, min_step, window, confidence_z)
        validate_curve_args(name, min_delta, patience, min_step, min_points)
        check_int(name, "dataset_size", dataset_size, 2, optional=True)
        check_number(name, "ema_beta", ema_beta, 0, 1, high_open=True)
        check_choice(name, "future_lr", future_lr, FUTURE_LR)
        check_number(name, "annealing_decay", annealing_decay, 0, 1, high_open=True)
        self.rules, self.check_every_n_steps = rules, check_every_n_steps
        self.patience, self.min_step = patience, min_step
        self.eta, self.dataset_size, self.ema_beta = float(eta), dataset_size, float(ema_beta)
        self.window, self.confidence_z = window, float(confidence_z)
        self.min_delta, self.min_points, self.future_lr = float(min_delta), min_points, future_lr
        self.annealing_decay, self.verbose = float(annealing_decay), verbose
        self.on_nonfinite = check_nonfinite_policy(name, on_nonfinite)
        self.monitor = (GradientStatsMonitor(log_every_n_steps=check_every_n_steps, norm_types=(), noise_scale=True,
                                             ema_beta=self.ema_beta, on_nonfinite=on_nonfinite)
                        if "noise_dominated" in rules else None)
        if self.monitor is not None:
            self.monitor._owner, self.monitor._writes_metrics = name, False
        self._per_sample: stats.StepGradientSamples | None = None  # the one-device, no-accumulation estimator
        self._nonfinite_warned = False
        self.noise_rule: NoiseDominatedRule | None = None  # built when N is known (train start)
        self.curve_rule = (LossCurveRule(self.min_delta, patience, min_step, min_points, self.annealing_decay)
                           if "loss_curve" in rules else None)
        self.stopped_step: int | None = None
        self.stopping_reason = ConvergenceStopReason.NOT_STOPPED
        self.stopping_reason_message: str | None = None
        self._pending_noise_state: dict[str, Any] | None = None
        self._loss_sum: Tensor | None = None
        self._loss_count = 0
        self._noise_fired = False
        self._lr_cache: tuple[int, list[float]] | None = None  # (first step, predicted LRs from that step on)
        self._check_done_at = -1

    @property
    def state_key(self) -> str:
        return self._generate_state_key(rules=self.rules, eta=self.eta, min_delta=self.min_delta)

    # -- hooks ------------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.monitor is not None:
            self.monitor.setup(trainer, pl_module, stage)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.monitor is not None:
            self.monitor.teardown(trainer, pl_module, stage)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        name = type(self).__name__
        if not pl_module.automatic_optimization:
            raise RuntimeError(f"{name} needs automatic optimization; the LightningModule disables it.")
        if self.monitor is not None and trainer.world_size == 1 and trainer.accumulate_grad_batches < 2:
            self._per_sample = stats.StepGradientSamples("per_sample", False, 64, name)
            self._per_sample.attach([p for p in pl_module.parameters() if p.requires_grad])
            rank_zero_info(
                f"{name}: one device and `accumulate_grad_batches`=1: the `noise_dominated` rule uses per-example "
                "gradients of up to 64 examples of the check step's batch (one extra vmapped backward per check)."
            )
        if self.curve_rule is not None and not math.isfinite(float(trainer.estimated_stepping_batches)):
            raise RuntimeError(
                f"{name}: the `loss_curve` rule predicts the loss at the end of the budget, which is unknown: set "
                "the Trainer's `max_steps` or `max_epochs`."
            )

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.monitor is None or self.noise_rule is not None:
            return
        n = self.dataset_size
        if n is None:
            dataset = getattr(trainer.train_dataloader, "dataset", None)
            try:
                n = len(dataset)  # type: ignore[arg-type]
            except TypeError as err:
                raise RuntimeError(
                    f"{type(self).__name__}: cannot read the training set's size; pass `dataset_size`."
                ) from err
        self.noise_rule = NoiseDominatedRule(int(n), self.eta, self.patience, self.min_step, self.window,
                                             self.confidence_z)
        if self._pending_noise_state is not None:
            self.noise_rule.load_state_dict(self._pending_noise_state)
            self._pending_noise_state = None

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._per_sample is not None:
            n = stats.batch_length(batch)
            self._per_sample.begin_batch(batch, n, capturing=trainer.global_step % self.check_every_n_steps == 0)
        elif self.monitor is not None:
            self.monitor.on_train_batch_start(trainer, pl_module, batch, batch_idx)

    @override
    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.monitor is not None:
            self.monitor.on_after_backward(trainer, pl_module)

    @override
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.curve_rule is not None:
            self.curve_rule.areas.step(float(optimizer.param_groups[0]["lr"]))
        if self.monitor is None or self.noise_rule is None:
            return
        if self._per_sample is not None:
            self._per_sample_update(trainer, pl_module)
            return
        before = self.monitor.tracker.grad_sq_ema.count
        self.monitor.on_before_optimizer_step(trainer, pl_module, optimizer)
        if self.monitor.tracker.grad_sq_ema.count > before:  # a fresh measurement was folded in
            tracker = self.monitor.tracker
            self._noise_fired = self.noise_rule.update(
                trainer.global_step, tracker.trace_ema.value, tracker.grad_sq_ema.value
            )

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.curve_rule is not None:
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            bad = isinstance(loss, Tensor) and not bool(torch.isfinite(loss.detach()).all())
            if trainer.world_size > 1:  # every rank takes the same branch
                bad = bool(trainer.strategy.reduce_boolean_decision(bad, all=False))
            if bad:
                # A non-finite loss never enters the fitted curve; the policy decides whether training goes on.
                self._nonfinite_warned = act_on_nonfinite(trainer, type(self).__name__, self.on_nonfinite, "loss",
                                                          warned=self._nonfinite_warned)
            elif isinstance(loss, Tensor):
                # Lightning divides the returned loss by the accumulation factor.
                value = loss.detach().float() * trainer.accumulate_grad_batches
                self._loss_sum = value if self._loss_sum is None else self._loss_sum + value
                self._loss_count += 1
        step = trainer.global_step
        if step == 0 or step % self.check_every_n_steps != 0 or self._check_done_at == step:
            return
        self._check_done_at = step
        self._check(trainer, step)

    def _per_sample_update(self, trainer: Trainer, pl_module: LightningModule) -> None:
        samples = self._per_sample
        assert samples is not None and self.noise_rule is not None
        if not samples.capturing:
            return
        batch = sum(samples._sizes) * trainer.world_size
        grads = stats.grads_of(pl_module.parameters())
        found = bool(grads) and not stats.all_finite(grads)
        found, self._nonfinite_warned = handle_nonfinite(trainer, pl_module, type(self).__name__, self.on_nonfinite,
                                                         found, self._nonfinite_warned)
        if not found and grads:
            s = samples.stats(trainer.world_size, hook_loss_factor(trainer), None, pl_module, None, batch)
            if s is not None:
                # ‖ḡ_B‖² overestimates ‖G‖² by tr Σ / B: subtract it (the two-batch estimator's unbiased form).
                g2 = s.grad_sq_norm - s.trace_cov / max(batch, 1)
                self._noise_fired = self.noise_rule.update(trainer.global_step, s.trace_cov, g2)
        samples.reset()

    # -- decisions --------------------------------------------------------------------------------------------
    def _check(self, trainer: Trainer, step: int) -> None:
        metrics: dict[str, float] = {}
        reason = ConvergenceStopReason.NOT_STOPPED
        if self.noise_rule is not None:
            metrics["required_batch"] = self.noise_rule.last_required_batch
            metrics["grad_sq_upper"] = self.noise_rule.last_grad_sq_upper
            metrics["noise_streak"] = float(self.noise_rule.streak)
            if self._noise_fired:
                reason = ConvergenceStopReason.NOISE_DOMINATED
        if self.curve_rule is not None and self._loss_count > 0:
            mean = self._loss_sum / self._loss_count
            if trainer.world_size > 1:
                mean = trainer.strategy.reduce(mean, reduce_op="mean")
            self._loss_sum, self._loss_count = None, 0
            self.curve_rule.record(step, float(mean))
            remaining = max(int(trainer.estimated_stepping_batches) - step, 0)
            fired = self.curve_rule.check(step, self._future_lrs(trainer, step, remaining))
            metrics["predicted_improvement"] = self.curve_rule.predicted_improvement
            metrics["predicted_final_loss"] = self.curve_rule.predicted_final_loss
            metrics["curve_streak"] = float(self.curve_rule.streak)
            if fired and reason is ConvergenceStopReason.NOT_STOPPED:
                reason = ConvergenceStopReason.LOSS_CURVE
        stop = trainer.strategy.reduce_boolean_decision(reason is not ConvergenceStopReason.NOT_STOPPED, all=False)
        if stop and self.stopped_step is None:
            self._record_stop(step, reason if reason is not ConvergenceStopReason.NOT_STOPPED
                              else ConvergenceStopReason.NOISE_DOMINATED)
        if stop:
            trainer.should_stop = True
        metrics["stopped"] = float(self.stopped_step is not None)
        log_metrics(trainer, "stop", {k: v for k, v in metrics.items() if not math.isnan(v)})

    def _record_stop(self, step: int, reason: ConvergenceStopReason) -> None:
        self.stopped_step, self.stopping_reason = step, reason
        if reason is ConvergenceStopReason.NOISE_DOMINATED:
            b_req = self.noise_rule.last_required_batch if self.noise_rule else math.nan
            self.stopping_reason_message = (
                f"Gradient below its noise for the whole dataset: the norm test needs a batch of {b_req:.4g} > "
                f"N={self.noise_rule.dataset_size if self.noise_rule else '?'} (eta={self.eta}) for "
                f"{self.patience} checks. Stopping at step {step}."
            )
        else:
            curve = self.curve_rule
            self.stopping_reason_message = (
                f"Loss-curve fit predicts an improvement of {curve.predicted_improvement:.4g} < "
                f"min_delta={self.min_delta} by the end of the budget (final loss "
                f"{curve.predicted_final_loss:.4g}) for {self.patience} checks. Stopping at step {step}."
            )
        if self.verbose:
            rank_zero_info(f"{type(self).__name__}: {self.stopping_reason_message}")

    def _future_lrs(self, trainer: Trainer, step: int, remaining: int) -> list[float]:
        optimizer = trainer.optimizers[0]
        lr_now = float(optimizer.param_groups[0]["lr"])
        configs = trainer.lr_scheduler_configs
        if self.future_lr == "constant" or not configs or isinstance(configs[0].scheduler, ReduceLROnPlateau):
            return [lr_now] * remaining
        cached = self._lr_cache
        if cached is not None:
            start, lrs = cached
            offset = step - start
            if 0 <= offset < len(lrs) and math.isclose(lrs[offset], lr_now, rel_tol=1e-9, abs_tol=1e-15):
                return lrs[offset:offset + remaining]
        lrs = _simulate_scheduler(trainer, configs[0], optimizer, step, remaining)
        self._lr_cache = (step, lrs)
        return lrs

    # -- state ------------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        noise_state = self.noise_rule.state_dict() if self.noise_rule is not None else self._pending_noise_state
        return {
            "version": self.STATE_VERSION,
            "noise_rule": noise_state,
            "monitor": self.monitor.state_dict() if self.monitor is not None else None,
            "curve_rule": self.curve_rule.state_dict() if self.curve_rule is not None else None,
            "stopped_step": self.stopped_step,
            "stopping_reason": self.stopping_reason.value,
            "stopping_reason_message": self.stopping_reason_message,
            "last_check_step": self._check_done_at,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_state_version(type(self).__name__, state_dict, self.STATE_VERSION)
        if self.monitor is not None and state_dict.get("monitor") is not None:
            self.monitor.load_state_dict(state_dict["monitor"])
        if self.curve_rule is not None and state_dict.get("curve_rule") is not None:
            self.curve_rule.load_state_dict(state_dict["curve_rule"])
        if state_dict.get("noise_rule") is not None:
            self._pending_noise_state = state_dict["noise_rule"]
            if self.noise_rule is not None:
                self.noise_rule.load_state_dict(self._pending_noise_state)
                self._pending_noise_state = None
        self.stopped_step = state_dict["stopped_step"]
        self.stopping_reason = ConvergenceStopReason(state_dict["stopping_reason"])
        self.stopping_reason_message = state_dict["stopping_reason_message"]
        # Without it, the first micro-batch after a resume at a check step would run that check a second time.
        self._check_done_at = int(state_dict["last_check_step"])


def _simulate_scheduler(trainer: Trainer, config: Any, optimizer: torch.optim.Optimizer, step: int,
                        remaining: int) -> list[float]:
    """:func:`~lightning_convergence.stopping.forecast_lrs` on the trainer's scheduler config (constant on failure)."""
    per_epoch = int(trainer.num_training_batches) // max(trainer.accumulate_grad_batches, 1)
    lrs = forecast_lrs(config.scheduler, optimizer, step, remaining, config.interval, config.frequency, per_epoch)
    if lrs is None:
        rank_zero_warn("ConvergenceEarlyStopping: cannot copy the LR scheduler; `future_lr`='constant'.")
        return [float(optimizer.param_groups[0]["lr"])] * remaining
    return lrs
