"""Record per-step gradient norms for schedule refinement, and optionally refine the schedule online."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_convergence import stats
from lightning_convergence._checks import check_choice, check_int, check_int_at_least, check_number, check_state_version
from lightning_convergence._metrics import log_metrics, should_log
from lightning_convergence._nonfinite import check_nonfinite_policy
from lightning_convergence.callbacks._common import finite_metrics, handle_nonfinite
from lightning_convergence.optim.refinement import (
    interp_profile,
    online_profile,
    refine_schedule,
    save_norms,
)

__all__ = ["ScheduleRefinement"]

_NORM_TYPES = ("auto", "l1", "l2")


def resolve_norm_type(optimizer: torch.optim.Optimizer) -> str:
    """``l1`` for Adam-type optimizers (a ``betas`` entry in the param groups, or "Adam" in the class name), else
    ``l2`` (the paper: l2 norms for SGD, l1 norms for Adam)."""
    if "betas" in optimizer.param_groups[0] or "adam" in type(optimizer).__name__.lower():
        return "l1"
    return "l2"


class ScheduleRefinement(Callback):
    """Record every optimizer step's gradient norm and turn it into a refined LR schedule (two-run or online).

    Paper: Defazio, Cutkosky, Mehta, Mishchenko. *When, Why and How Much? Adaptive Learning Rate Scheduling by
    Refinement.* arXiv:2310.07831, 2023. The math lives in :mod:`lightning_convergence.optim.refinement`.

    Two-run method (the paper's): run 1 with this callback (any schedule, typically linear decay) writes the norms to
    ``norms_path``; run 2 uses ``RefinedSchedule(norms=<that file>, total_steps=T)`` as its LR scheduler.

    Online mode (``online=True``, beyond the paper): every ``refit_every_n_steps`` optimizer steps the schedule is
    refit from the norms seen so far, with the most recent smoothed norm extrapolated as constant over the rest of
    the budget ``T = trainer.estimated_stepping_batches``, and each group's rate is set to
    ``min(previous, peak * eta_step)`` before the optimizer step (``peak`` = the group's ``initial_lr`` or ``lr`` at
    train start). Until the first refit the configured scheduler (e.g. warm-up + linear decay) is in charge. The rate
    never exceeds the peak and, with ``monotone=True``, never rises after the first refit.

    Deviations: norms are taken in ``on_before_optimizer_step`` (after AMP unscaling and the DDP all-reduce, before
    gradient clipping); a step with non-finite gradients is never recorded and follows ``on_nonfinite`` (with
    ``"skip"`` the recorded sequence may be shorter than the step count; the refined schedule is read in relative
    time, so this only shifts it slightly). The online mode's constant extrapolation is our choice; the paper
    only defines the two-run method.

    Args:
        norm_type: ``"auto"`` (l1 for Adam-type optimizers, i.e. groups with ``betas``; l2 otherwise), ``"l1"`` or
            ``"l2"``. Default ``"auto"``.
        norms_path: where to write the norms at fit end (``.json``, or anything else for ``torch.save``). Default
            ``None``: ``<trainer.log_dir or default_root_dir>/refinement_norms.json``.
        smoothing_tau: median-filter width fraction ``tau`` in [0, 1]. Default 0.1 (the paper's).
        online: refine during this run. Default ``False`` (record only).
        refit_every_n_steps: refit interval in optimizer steps, >= 2. Default 100. Smaller reacts sooner but each
            refit costs a median filter over up to 10,000 points (a few ms on CPU).
        monotone: in online mode, never raise the rate after the first refit. Default ``True``.
        log_plot: at fit end, log a plot of the refined schedule to loggers with ``log_image`` (W&B). Default ``True``.
        log_every_n_steps: logging interval; ``None`` uses the trainer's ``log_every_n_steps``.
        on_nonfinite: ``"stop"`` (default) or ``"skip"``: the shared non-finite policy
            (``lightning_convergence._nonfinite``) for non-finite gradients; the step is not applied either way.

    State: the recorded norms, the resolved norm type, the skip counter, and in online mode the peak LRs, the
    current fitted profile and the last applied multiplier, with a ``version`` key.

    Logs: ``convergence/schedule/lr`` (group 0's rate used for this step), ``convergence/schedule/grad_norm``,
    ``convergence/schedule/nonfinite_skipped_total``; a ``convergence/schedule/refined_schedule`` image at fit end.

    Raises:
        ValueError: for an unknown ``norm_type`` or ``on_nonfinite``, ``smoothing_tau`` outside [0, 1], or
            ``refit_every_n_steps`` < 2.

    Example::

        Trainer(max_steps=600, callbacks=[ScheduleRefinement(norms_path="runs/a/norms.json")])   # run 1
        RefinedSchedule(opt, norms="runs/a/norms.json", total_steps=600)                         # run 2
    """

    STATE_VERSION = 1

    def __init__(
        self,
        norm_type: str = "auto",
        norms_path: str | None = None,
        smoothing_tau: float = 0.1,
        online: bool = False,
        refit_every_n_steps: int = 100,
        monotone: bool = True,
        log_plot: bool = True,
        log_every_n_steps: int | None = None,
        on_nonfinite: str = "stop",
    ) -> None:
        self.on_nonfinite = check_nonfinite_policy(type(self).__name__, on_nonfinite)
        self._nonfinite_warned = False
        owner = "ScheduleRefinement"
        check_choice(owner, "norm_type", norm_type, _NORM_TYPES)
        check_number(owner, "smoothing_tau", smoothing_tau, 0, 1)
        check_int_at_least(owner, "refit_every_n_steps", refit_every_n_steps, 2)
        check_int(owner, "log_every_n_steps", log_every_n_steps, 1, optional=True)
        self.norm_type = norm_type
        self.norms_path = norms_path
        self.smoothing_tau = float(smoothing_tau)
        self.online = bool(online)
        self.refit_every_n_steps = refit_every_n_steps
        self.monotone = bool(monotone)
        self.log_plot = bool(log_plot)
        self.log_every_n_steps = log_every_n_steps
        self.norms: list[float] = []
        self.resolved_norm_type: str | None = None if norm_type == "auto" else norm_type
        self.nonfinite_skipped_total = 0
        self.peak_lrs: list[float] | None = None
        self.profile: list[float] | None = None
        self.scale: float | None = None
        self.saved_path: Path | None = None
        self._total_steps: int | None = None
        self._warned_loggers: set[str] = set()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(online=self.online, norms_path=self.norms_path)

    # -- hooks ------------------------------------------------------------------------------------------------
    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.optimizers:
            return
        opt = trainer.optimizers[0]
        if self.resolved_norm_type is None:
            self.resolved_norm_type = resolve_norm_type(opt)
        if self.peak_lrs is None:
            self.peak_lrs = [float(g.get("initial_lr", g["lr"])) for g in opt.param_groups]
        budget = float(trainer.estimated_stepping_batches)  # computed once per fit: it can walk the dataloaders
        self._total_steps = int(budget) if budget < float("inf") else None
        if self.online and self._total_steps is None:
            raise ValueError("ScheduleRefinement: `online=True` needs a finite budget; set the trainer's `max_steps` "
                             "or `max_epochs`.")

    @override
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        grads = stats.grads_of(pl_module.parameters())
        norm = float("nan")
        if grads:  # one host read per step: a non-finite gradient makes the norm non-finite (the norm is recorded)
            norm = float(stats.l1_norm(grads) if self.resolved_norm_type == "l1" else stats.l2_norm(grads))
        bad, self._nonfinite_warned = handle_nonfinite(trainer, pl_module, type(self).__name__, self.on_nonfinite,
                                                       bool(grads) and not math.isfinite(norm), self._nonfinite_warned)
        if bad:
            self.nonfinite_skipped_total += 1
            norm = float("nan")
        elif grads:
            self.norms.append(norm)
        if self.online:
            self._apply_online(trainer, optimizer)
        if should_log(trainer, self.log_every_n_steps):
            metrics = {"grad_norm": norm, "lr": float(optimizer.param_groups[0]["lr"]),
                       "nonfinite_skipped_total": self.nonfinite_skipped_total}
            # No estimate this step (no or skipped gradients): the key is dropped, never left stale.
            log_metrics(trainer, "schedule", finite_metrics(trainer, "schedule", metrics))

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if len(self.norms) < 2 or self.resolved_norm_type is None:
            return
        path = self._path(trainer)
        if trainer.is_global_zero:
            self.saved_path = save_norms(
                path, self.norms, self.resolved_norm_type,
                nonfinite_skipped_total=self.nonfinite_skipped_total, global_step=int(trainer.global_step),
            )
            if self.log_plot:
                self._log_plot(trainer, path)
        else:
            self.saved_path = path

    # -- online mode ------------------------------------------------------------------------------------------
    def _apply_online(self, trainer: Trainer, optimizer: torch.optim.Optimizer) -> None:
        step = trainer.global_step
        total = self._total_steps or int(trainer.estimated_stepping_batches)
        k = len(self.norms)
        if k >= self.refit_every_n_steps and step % self.refit_every_n_steps == 0 and 0 < step < total:
            self.profile = online_profile(self.norms, max(total, k), self.resolved_norm_type or "l2",
                                          self.smoothing_tau).tolist()
        if self.profile is None or self.peak_lrs is None:
            return
        eta = self.profile[min(step, len(self.profile) - 1)]
        scale = min(1.0, eta)
        if self.monotone and self.scale is not None:
            scale = min(scale, self.scale)
        self.scale = scale
        for group, peak in zip(optimizer.param_groups, self.peak_lrs):
            group["lr"] = peak * scale

    # -- output -----------------------------------------------------------------------------------------------
    def _path(self, trainer: Trainer) -> Path:
        if self.norms_path:
            return Path(self.norms_path)
        root = trainer.log_dir or trainer.default_root_dir or os.getcwd()
        return Path(root) / "refinement_norms.json"

    def _log_plot(self, trainer: Trainer, path: Path) -> None:
        loggers = [lg for lg in trainer.loggers if callable(getattr(lg, "log_image", None))]
        for lg in trainer.loggers:
            name = type(lg).__name__
            if lg not in loggers and name not in self._warned_loggers:
                self._warned_loggers.add(name)
                rank_zero_warn(f"ScheduleRefinement: logger {name} has no `log_image`; the refined-schedule plot is "
                               f"only written to {path.with_suffix('.png')}.")
        png = self.plot(path.with_suffix(".png"), int(trainer.global_step) or len(self.norms))
        if png is None:
            return
        for lg in loggers:
            lg.log_image(key="convergence/schedule/refined_schedule", images=[str(png)], step=trainer.global_step)

    def plot(self, png_path: str | os.PathLike, total_steps: int) -> Path | None:
        """Draw the recorded norms and the refined schedule over ``total_steps`` into ``png_path`` (Agg backend)."""
        try:
            import matplotlib

            matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt
        except ImportError:
            rank_zero_warn("ScheduleRefinement: matplotlib is not installed; no refined-schedule plot.")
            return None
        profile = refine_schedule(self.norms, self.resolved_norm_type or "l2", self.smoothing_tau).tolist()
        steps = list(range(total_steps))
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(steps, [interp_profile(profile, s / max(total_steps, 1)) for s in steps], label="refined lr / peak")
        ax2 = ax.twinx()
        ax2.plot(range(len(self.norms)), self.norms, color="tab:gray", alpha=0.5,
                 label=f"grad {self.resolved_norm_type} norm")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("lr / peak")
        ax2.set_ylabel("gradient norm")
        fig.legend(loc="upper right")
        fig.tight_layout()
        png_path = Path(png_path)
        png_path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(png_path, dpi=80)
        plt.close(fig)
        return png_path

    # -- state ------------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": self.STATE_VERSION,
            "norms": list(self.norms),
            "resolved_norm_type": self.resolved_norm_type,
            "nonfinite_skipped_total": self.nonfinite_skipped_total,
            "peak_lrs": self.peak_lrs,
            "profile": self.profile,
            "scale": self.scale,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_state_version(type(self).__name__, state_dict, self.STATE_VERSION)
        self.norms = [float(x) for x in state_dict["norms"]]
        self.resolved_norm_type = state_dict["resolved_norm_type"]
        self.nonfinite_skipped_total = int(state_dict["nonfinite_skipped_total"])
        self.peak_lrs = state_dict["peak_lrs"]
        self.profile = state_dict["profile"]
        self.scale = state_dict["scale"]
