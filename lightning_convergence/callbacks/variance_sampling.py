"""Sample data groups by a gradient-variance-aware budget (GVM, Neyman, temperature cooldown), importance-weighted."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.data import extract_batch_size
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from lightning_convergence._checks import argument_error, check_state_version
from lightning_convergence._metrics import log_metrics
from lightning_convergence._nonfinite import check_nonfinite_policy
from lightning_convergence.callbacks._common import finite_metrics
from lightning_convergence.callbacks._group_probe import GroupProbe
from lightning_convergence.data import rebuild_dataloader, wrap_train_dataloader
from lightning_convergence.sampling import (
    GroupBudgetSampler,
    GroupStats,
    allocate_budget,
    check_sampling_args,
    cooldown_temperature,
    effective_sample_size_sum,
    resolve_groups,
    weighted_estimator_variance,
)
from lightning_convergence.stats.module_grads import BatchLossFn, ExampleGradients

__all__ = ["GradientVarianceSampling", "resolve_groups"]


class GradientVarianceSampling(GroupProbe, Callback):
    """Re-allocate each data group's share of the sampled examples from gradient statistics; deliver importance
    weights so the weighted loss stays an unbiased estimate of the uniform full-data objective.

    Paper: Yao, Hao, Zhang, Dong, Xiong, Jiang, Zhang. *Optimizing Chain-of-Thought Reasoners via Gradient Variance
    Minimization in Rejection Sampling and RL* (GVM-RAFT), NeurIPS 2025, arXiv:2505.02391 (``gvm``:
    ``n_i ∝ G_i / sqrt(p_i + α/p_i^(β−1))``, verified against RLHFlow/GVM). Neyman, *On the Two Different Aspects
    of the Representative Method*, JRSS 1934 (``neyman``: ``n_i ∝ π_i σ_i``, optimal for stratified batches only;
    ``min_variance``: ``n_i ∝ π_i sqrt(E‖∇f‖²)``, the optimum for the shuffled batches delivered here). Li, Xu, Tan,
    Murray, Khashabi.
    *Upsample or Upweight? Balanced Training on Heavily Imbalanced Datasets*, NAACL 2025, arXiv:2410.04579
    (``temperature``: ``n_i ∝ N_i^(1/T)`` with a cooldown of ``T``). Formulas: :mod:`lightning_convergence.sampling`.

    The math is in :mod:`lightning_convergence.sampling` (:class:`GroupBudgetSampler`, :class:`GroupStats`,
    :func:`allocate_budget`); the card ``docs/algorithms/variance_sampling.md`` explains the mechanics. This callback
    installs the sampler in ``setup``; every ``check_every_n_steps`` optimizer steps it probes ``probe_per_group``
    seeded examples per group (exact per-example gradients of the module's own loss) and sets the allocation of the
    next windows (``check_every_n_steps × batch_size × accumulate_grad_batches × world_size`` draws each). Before
    each batch it sets ``pl_module.sample_weights`` (``w = (N_i/N)/(n_i/n)``) and ``pl_module.sample_groups``; the
    module applies the weights in one line and declares ``uses_sample_weights = True``::

        loss = (F.cross_entropy(logits, y, reduction="none") * self.sample_weights).mean()

    Generate-and-filter training (GVM's ``p_i``): call :meth:`record_acceptance` from ``training_step``.

    Deviations: (1) GVM's ``G_i`` is measured on accepted samples of an LLM's embedding gradients; here it is the
    mean per-example gradient norm on a small stratified probe of the parameters named in ``probe_params`` (all by
    default). (2) Groups of unequal size get ``π_i``-weighted scores (the paper's prompts weigh equally; with equal
    sizes the allocation is exactly the paper's). (3) A new allocation applies from the next window the loader has not
    drawn yet (a prefetching loader may have drawn one ahead). (4) ``min_per_group`` draws per group keep the
    weighted estimator unbiased. (5) An epoch is ``ceil(len(dataset)/window)`` whole windows; it fixes the sample
    budget, not the coverage (under a skewed allocation some examples repeat and others wait).

    Args:
        policy: ``"gvm"`` (default), ``"min_variance"`` (the per-batch variance optimum: recommended when the goal
            is a lower-variance gradient), ``"neyman"``, ``"uniform"`` or ``"temperature"``.
        check_every_n_steps: optimizer steps between re-allocations (probes, logs), ≥ 1. Default ``50``.
        group_fn: ``group_fn(dataset, index) -> int``; default: the dataset's ``groups``/``targets``/``labels``
            attribute, or a ``TensorDataset``'s last (integer label) tensor. Called once per example at setup.
        num_groups: K; default ``max(group id) + 1``.
        group_names: names used in the per-group log keys; default the group ids.
        probe_per_group: examples per group in each probe, ≥ 2, or 0 to never probe (only ``uniform``/
            ``temperature``). Default ``8`` (cost: one per-example gradient over ``K × probe_per_group`` examples).
        probe_params: parameter-name prefixes to differentiate in the probe (e.g. ``["net.4"]`` for the last layer,
            GVM's cheap-proxy idea); default all trainable parameters.
        batch_loss_fn: ``batch_loss_fn(module, batch) -> scalar``, the mean loss of a collated batch. Default
            ``None``: the module's ``training_step`` (weights all ones, logs silenced), or for a module declaring
            ``uses_sample_weights = True`` cross-entropy of ``forward(inputs)`` on ``(inputs, targets)``.
        loss_fn: ``loss_fn(output, target)`` on ``module(inputs)``, mean-reduced; an alternative to
            ``batch_loss_fn`` for ``(inputs, targets)`` batches. Default ``None``.
        batch_to_inputs: maps a collated probe batch to ``(inputs, targets)`` for ``loss_fn`` (cross-entropy when
            ``loss_fn`` is unset); default ``(batch[0], batch[1])``.
        reweight: deliver importance weights (default ``True``: unbiased for the uniform objective). ``False``
            trains on the sampling mixture itself (the paper setting of temperature sampling).
        gvm_statistic: ``G_i`` for ``gvm``: ``"mean_norm"`` (default, the paper's ``E‖∇f‖``) or ``"rms_norm"``
            (``sqrt(E‖∇f‖²)``: the exact variance optimum ``q ∝ π·sqrt(M)`` for i.i.d. draws).
        ema_beta: EMA factor of the group statistics, in [0, 1). Default ``0.9``.
        alpha: GVM's α ≥ 0. Default ``1e-3`` (paper/code).
        beta: GVM's β. Default ``2.0`` (paper/code).
        min_per_group: draws per non-empty group per window, ≥ 0 (≥ 1 with ``reweight``). Default ``1``.
        start_temperature: ``T`` at the start (``temperature``), > 0. Default ``5.0`` (``T = 1``: proportional).
        end_temperature: ``T`` after the cooldown, > 0. Default ``1.0`` (back to proportional sampling).
        cooldown_start_step: optimizer step where the cooldown starts, ≥ 0. Default ``0``.
        cooldown_steps: length of the cooldown in optimizer steps, ≥ 0 (0 = a jump). Default ``1000``.
        cooldown_shape: ``"linear"`` (default) or ``"cosine"`` (our choices; the paper fixes no shape).
        seed: seed of the sampler and of the probes, same on all ranks. Default ``0``.
        log_per_item: also log each group's budget as ``convergence/sampling/budget/<group>``. Default ``False``.
        on_nonfinite: ``"stop"`` (default) or ``"skip"``: the shared non-finite policy
            (``lightning_convergence._nonfinite``) for a probe with non-finite per-example gradients; the probe never
            enters the group statistics, and with ``"skip"`` the allocation is made from the statistics before it.

    State: group statistics, the sampler's position and allocations, pending acceptance counts, ESS accumulators,
    the last re-allocation step, ``version``; ``policy``, ``check_every_n_steps`` and ``seed`` are checked on load.

    Logs (at each re-allocation): ``convergence/sampling/grad_variance`` (estimated per-example trace covariance of
    the (weighted) gradient under the current allocation), ``convergence/sampling/grad_variance_uniform`` (the same
    under uniform sampling), ``convergence/sampling/effective_sample_size`` (mean Kish ESS of the per-device batches
    since the last log, over all ranks, in examples), ``convergence/sampling/temperature`` (``temperature`` policy),
    ``convergence/sampling/nonfinite_skipped_total``, ``convergence/sampling/step_overhead_ms``, and with
    ``log_per_item`` ``convergence/sampling/budget/<group>``.

    Raises:
        ValueError: for an unknown ``policy`` or ``cooldown_shape``, or a value out of its range (named).
        TypeError: at setup, if the groups cannot be derived or the train loader has no ``batch_size``.
        RuntimeError: on a checkpoint state of another ``version``.

    Example::

        Trainer(callbacks=[GradientVarianceSampling(policy="gvm", check_every_n_steps=20)])
    """

    STATE_VERSION = 1

    def __init__(
        self,
        policy: str = "gvm",
        check_every_n_steps: int = 50,
        group_fn: Callable[[Dataset, int], int] | None = None,
        num_groups: int | None = None,
        group_names: Sequence[str] | None = None,
        probe_per_group: int = 8,
        probe_params: Sequence[str] | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        batch_to_inputs: Callable[[Any], tuple[Tensor, Tensor]] | None = None,
        batch_loss_fn: BatchLossFn | None = None,
        reweight: bool = True,
        gvm_statistic: str = "mean_norm",
        ema_beta: float = 0.9,
        alpha: float = 1e-3,
        beta: float = 2.0,
        min_per_group: int = 1,
        start_temperature: float = 5.0,
        end_temperature: float = 1.0,
        cooldown_start_step: int = 0,
        cooldown_steps: int = 1000,
        cooldown_shape: str = "linear",
        seed: int = 0,
        log_per_item: bool = False,
        on_nonfinite: str = "stop",
    ) -> None:
        name = type(self).__name__
        self.on_nonfinite = check_nonfinite_policy(name, on_nonfinite)
        self._nonfinite_warned = False
        check_sampling_args(
            name, policy=policy, check_every_n_steps=check_every_n_steps, min_per_group=min_per_group,
            cooldown_start_step=cooldown_start_step, cooldown_steps=cooldown_steps, probe_per_group=probe_per_group,
            reweight=reweight, ema_beta=ema_beta, alpha=alpha, start_temperature=start_temperature,
            end_temperature=end_temperature, gvm_statistic=gvm_statistic, cooldown_shape=cooldown_shape,
        )
        self.policy = policy
        self.check_every_n_steps = check_every_n_steps
        self.group_fn = group_fn
        self.num_groups = num_groups
        self.group_names = list(group_names) if group_names is not None else None
        self.probe_per_group = probe_per_group
        self.probe_params = tuple(probe_params) if probe_params is not None else None
        for field, fn in (("loss_fn", loss_fn), ("batch_to_inputs", batch_to_inputs), ("batch_loss_fn", batch_loss_fn)):
            if fn is not None and not callable(fn):
                raise argument_error(name, field, "None or a callable", fn, TypeError)
        self.loss_fn = loss_fn
        self.batch_to_inputs = batch_to_inputs
        self.batch_loss_fn = batch_loss_fn
        self._grads: ExampleGradients | None = None  # built at the first probe (the default depends on the module)
        self.reweight = reweight
        self.gvm_statistic = gvm_statistic
        self.ema_beta = float(ema_beta)
        self.alpha, self.beta = float(alpha), float(beta)
        self.min_per_group = min_per_group
        self.start_temperature, self.end_temperature = float(start_temperature), float(end_temperature)
        self.cooldown_start_step, self.cooldown_steps = cooldown_start_step, cooldown_steps
        self.cooldown_shape = cooldown_shape
        self.seed = seed
        self.log_per_item = log_per_item
        self.sampler: GroupBudgetSampler | None = None
        self.group_stats: GroupStats | None = None
        self.last_metrics: dict[str, float] = {}
        self._dataset: Dataset | None = None
        self._collate: Callable[[list[Any]], Any] | None = None
        self._undo: Callable[[], None] | None = None
        self._pending_state: dict[str, Any] | None = None
        self._accept = torch.zeros(2, 0, dtype=torch.float64)  # [accepted; generated] per group, not yet folded
        self._ess = [0.0, 0]  # sum of batch ESS, number of batches since the last log
        self._batch_weights: list[Tensor] = []  # this window's batch weights; ESS computed at the log, not per step
        self._last_step = -1
        self._overhead_s = 0.0
        self._warned = False

    @property
    def state_key(self) -> str:
        # Lightning reads this at every hook call; build the string once per (policy, check_every_n_steps).
        key = (self.policy, self.check_every_n_steps)
        if getattr(self, "_state_key", (None, ""))[0] != key:
            state_key = self._generate_state_key(policy=self.policy, check_every_n_steps=self.check_every_n_steps)
            self._state_key = (key, state_key)
        return self._state_key[1]

    # -- hooks ----------------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and self._undo is None:
            self._undo = wrap_train_dataloader(trainer, lambda loader: self._install(trainer, loader))

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._undo is not None:
            self._undo()
            self._undo = None

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.reweight and not getattr(pl_module, "uses_sample_weights", False) and not self._warned:
            self._warned = True
            warnings.warn(
                f"GradientVarianceSampling: `reweight=True` but {type(pl_module).__name__} does not declare "
                "`uses_sample_weights = True`: unless its loss multiplies per-example losses by "
                "`self.sample_weights`, training follows the sampling mixture, not the uniform objective.",
                stacklevel=2,
            )
        if trainer.global_step == 0 and self._last_step < 0:
            self._reallocate(trainer, pl_module)  # allocate from a first probe before the first window is drawn

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Lightning sets the sampler's epoch from its count of processed epochs, which is one ahead of
        # `current_epoch` after a `max_steps` run resumes a checkpoint written in `on_train_epoch_end`.
        self._require_sampler().set_epoch(trainer.current_epoch)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        weights, groups = self._require_sampler().pop(int(extract_batch_size(batch)))
        if not self.reweight:
            weights = torch.ones_like(weights)
        self._batch_weights.append(weights)
        pl_module.sample_weights = weights.to(pl_module.device)
        pl_module.sample_groups = groups.to(pl_module.device)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step > 0 and step % self.check_every_n_steps == 0 and step != self._last_step:
            self._reallocate(trainer, pl_module)

    # -- generate-and-filter ----------------------------------------------------------------------------------------
    # -- internals ----------------------------------------------------------------------------------------------------
    def _require_sampler(self) -> GroupBudgetSampler:
        if self.sampler is None:
            raise RuntimeError(
                "GradientVarianceSampling: the train loader was not re-sampled; was the callback attached before fit?"
            )
        return self.sampler

    def _install(self, trainer: Trainer, loader: DataLoader) -> DataLoader:
        """Build (once) the group sampler for ``loader``'s dataset and return the loader re-sampled by it."""
        if loader.batch_size is None:
            raise TypeError(
                "GradientVarianceSampling: the train DataLoader has a custom `batch_sampler`; give it `batch_size` "
                "instead (the variance sampler must be the index sampler)."
            )
        if self.sampler is None or self._dataset is not loader.dataset:
            groups = resolve_groups(loader.dataset, self.group_fn)
            world = trainer.world_size
            window = self.check_every_n_steps * loader.batch_size * trainer.accumulate_grad_batches * world
            self.sampler = GroupBudgetSampler(
                loader.dataset, groups, num_groups=self.num_groups, window_size=window,
                num_replicas=world, rank=trainer.global_rank, seed=self.seed,
            )
            self.group_stats = GroupStats(self.sampler.num_groups, beta=self.ema_beta)
            self._dataset = loader.dataset
            if self._pending_state is not None:
                self._apply_state(self._pending_state)
                self._pending_state = None
        self._collate = loader.collate_fn
        return rebuild_dataloader(loader, sampler=self.sampler)

    def _temperature(self, step: int) -> float:
        return cooldown_temperature(
            step, self.start_temperature, self.end_temperature, self.cooldown_start_step, self.cooldown_steps,
            self.cooldown_shape,
        )

    def _reallocate(self, trainer: Trainer, pl_module: LightningModule) -> None:
        t0 = time.perf_counter()
        sampler, gs = self._require_sampler(), self.group_stats
        assert gs is not None  # created with the sampler
        self._last_step = trainer.global_step
        self._probe(trainer, pl_module)
        self._fold_acceptance(trainer)
        temperature = self._temperature(trainer.global_step)
        counts = allocate_budget(
            self.policy, sampler.window_size, sampler.group_sizes,
            grad_norms=gs.value("grad_norm") if self.gvm_statistic == "mean_norm" else gs.value("grad_sq").sqrt(),
            grad_stds=gs.value("grad_var").clamp_min(0).sqrt(), grad_rms=gs.value("grad_sq").sqrt(),
            accept_rates=gs.value("accept_rate", default=1.0), temperature=temperature,
            alpha=self.alpha, beta=self.beta, min_per_group=self.min_per_group,
        )
        sampler.set_allocation(counts)
        self._overhead_s += time.perf_counter() - t0
        self._log(trainer, counts, temperature)

    def _log(self, trainer: Trainer, counts: Tensor, temperature: float) -> None:
        sampler, gs = self._require_sampler(), self.group_stats
        assert gs is not None
        share = sampler.group_sizes.double() / sampler.group_sizes.sum()
        metrics: dict[str, float] = {
            "nonfinite_skipped_total": gs.nonfinite_skipped_total,
            "step_overhead_ms": 1e3 * self._overhead_s,
        }
        if gs.measured("grad_sq").any():
            q = counts.double() / counts.sum() if self.reweight else share
            m, full = gs.value("grad_sq"), gs.full_grad_sq
            metrics["grad_variance"] = weighted_estimator_variance(share, q, m, full)
            metrics["grad_variance_uniform"] = weighted_estimator_variance(share, share, m, full)
        self._fold_ess()
        ess = torch.tensor(self._ess, dtype=torch.float64)
        if trainer.world_size > 1:  # every rank logs at the same re-allocation step, so the collective is matched
            ess = trainer.strategy.reduce(ess, reduce_op="sum")
        if ess[1] > 0:
            metrics["effective_sample_size"] = float(ess[0] / ess[1])
        if self.policy == "temperature":
            metrics["temperature"] = temperature
        if self.log_per_item:
            names = self.group_names or [str(g) for g in range(sampler.num_groups)]
            metrics.update({f"budget/{names[g]}": float(c) for g, c in enumerate(counts.tolist())})
        self.last_metrics = log_metrics(trainer, "sampling", finite_metrics(trainer, "sampling", metrics))
        self._ess = [0.0, 0]
        self._overhead_s = 0.0

    def _fold_ess(self) -> None:
        self._ess[0] += effective_sample_size_sum(self._batch_weights)
        self._ess[1] += len(self._batch_weights)
        self._batch_weights = []

    # -- state --------------------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        self._fold_ess()
        state: dict[str, Any] = {
            "version": self.STATE_VERSION,
            "policy": self.policy,
            "check_every_n_steps": self.check_every_n_steps,
            "seed": self.seed,
            "last_step": self._last_step,
            "accept": self._accept.clone(),
            "ess": torch.tensor([self._ess[0], float(self._ess[1])], dtype=torch.float64),
        }
        if self.sampler is not None and self.group_stats is not None:
            state["sampler"] = self.sampler.state_dict()
            state["group_stats"] = self.group_stats.state_dict()
        elif self._pending_state is not None:
            state["sampler"] = self._pending_state.get("sampler")
            state["group_stats"] = self._pending_state.get("group_stats")
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_state_version(type(self).__name__, state_dict, self.STATE_VERSION)
        for field in ("policy", "check_every_n_steps", "seed"):
            if state_dict[field] != getattr(self, field):
                warnings.warn(
                    f"GradientVarianceSampling: `{field}` is {getattr(self, field)!r} but the checkpoint was written "
                    f"with {state_dict[field]!r}; keeping the configured value.",
                    stacklevel=2,
                )
        self._last_step = int(state_dict["last_step"])
        self._accept = state_dict["accept"].clone().double()
        ess = state_dict["ess"]
        self._ess = [float(ess[0]), int(ess[1])]
        self._batch_weights = []
        if self.sampler is not None:
            self._apply_state(state_dict)
        else:
            self._pending_state = state_dict

    def _apply_state(self, state: dict[str, Any]) -> None:
        if state.get("sampler") is None or self.sampler is None or self.group_stats is None:
            return
        self.sampler.load_state_dict(state["sampler"])
        self.group_stats.load_state_dict(state["group_stats"])
