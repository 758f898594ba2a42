"""The probing half of :class:`~lightning_convergence.callbacks.GradientVarianceSampling` (private): per-example
gradients of a stratified probe (:meth:`GroupBudgetSampler.probe_indices`, :class:`ExampleGradients`) folded into
:class:`GroupStats`, and the acceptance counts of generate-and-filter training."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor
from torch.utils.data import Dataset

from lightning_convergence._nonfinite import act_on_nonfinite
from lightning_convergence.callbacks._common import probe_loss
from lightning_convergence.sampling import GroupBudgetSampler, GroupStats
from lightning_convergence.stats.module_grads import BatchLossFn, ExampleGradients

__all__ = ["GroupProbe"]


class GroupProbe:
    """Mixin: the host class sets these attributes in ``__init__`` and provides ``_require_sampler``."""

    seed: int
    probe_per_group: int
    probe_params: tuple[str, ...] | None
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None
    batch_to_inputs: Callable[[Any], tuple[Tensor, Tensor]] | None
    batch_loss_fn: BatchLossFn | None
    on_nonfinite: str
    group_stats: GroupStats | None
    _grads: ExampleGradients | None
    _dataset: Dataset | None
    _collate: Callable[[list[Any]], Any] | None
    _accept: Tensor
    _nonfinite_warned: bool

    def _require_sampler(self) -> GroupBudgetSampler:
        raise NotImplementedError

    def record_acceptance(self, groups: Tensor, accepted: Tensor) -> None:
        """Count generated candidates (``groups``: their group ids) and which passed the filter (``accepted``:
        bools), for GVM's acceptance rates ``p_i``. Call from ``training_step``; folded in at the next re-allocation.
        """
        k = self._require_sampler().num_groups
        groups = torch.as_tensor(groups).long().flatten().cpu()
        accepted = torch.as_tensor(accepted).flatten().cpu().double()
        if self._accept.shape[1] != k:
            self._accept = torch.zeros(2, k, dtype=torch.float64)
        self._accept[0] += torch.bincount(groups, weights=accepted, minlength=k)
        self._accept[1] += torch.bincount(groups, minlength=k).double()

    def _fold_acceptance(self, trainer: Trainer) -> None:
        if self._accept.shape[1] == 0 and trainer.world_size == 1:
            return
        k = self._require_sampler().num_groups
        counts = self._accept if self._accept.shape[1] == k else torch.zeros(2, k, dtype=torch.float64)
        if trainer.world_size > 1:  # every rank re-allocates at the same step, so this collective is matched
            counts = trainer.strategy.reduce(counts.clone(), reduce_op="sum")
        if counts[1].sum() > 0 and self.group_stats is not None:
            self.group_stats.update_acceptance(counts[0].cpu(), counts[1].cpu())
        self._accept = torch.zeros(2, k, dtype=torch.float64)

    def _probe(self, trainer: Trainer, pl_module: LightningModule) -> None:
        sampler, gs = self._require_sampler(), self.group_stats
        if self.probe_per_group == 0 or gs is None or self._dataset is None:
            return
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + trainer.global_step)
        indices, groups = sampler.probe_indices(self.probe_per_group, gen)  # identical on every rank
        batch = move_data_to_device(self._collate([self._dataset[i] for i in indices.tolist()]), pl_module.device)
        params = {
            n: p for n, p in pl_module.named_parameters()
            if p.requires_grad and (self.probe_params is None or n.startswith(self.probe_params))
        }
        was_training = pl_module.training
        pl_module.eval()  # deterministic probe (no dropout draws)
        weights = pl_module.__dict__.get("sample_weights")
        pl_module.sample_weights = torch.ones(1, device=pl_module.device)  # one example per vmapped call
        try:
            # Per example: every (vmapped or looped) call sees a batch of one.
            grads, _ = self._example_grads(pl_module)(pl_module, batch, params)
        finally:
            pl_module.train(was_training)
            if weights is None:
                pl_module.__dict__.pop("sample_weights", None)
            else:
                pl_module.sample_weights = weights
        share = sampler.group_sizes.double() / sampler.group_sizes.sum()
        bad = not gs.update_grads(groups, list(grads.values()), group_weights=share)
        if trainer.world_size > 1:  # every rank probes at the same step, so the collective is matched
            bad = bool(trainer.strategy.reduce_boolean_decision(bad, all=False))
        if bad:
            self._nonfinite_warned = act_on_nonfinite(trainer, type(self).__name__, self.on_nonfinite,
                                                      "probe gradients", warned=self._nonfinite_warned)

    def _example_grads(self, pl_module: LightningModule) -> ExampleGradients:
        if self._grads is None:
            name = type(self).__name__
            loss = probe_loss(name, self.batch_loss_fn, self.loss_fn, self.batch_to_inputs)
            if loss is None and getattr(pl_module, "uses_sample_weights", False):
                # A module written for this callback may read per-batch attributes (sample_groups) or record
                # acceptance in training_step: probe it by cross-entropy of forward(inputs), as it was designed for.
                loss = probe_loss(name, None, F.cross_entropy)
            self._grads = ExampleGradients(name, loss)
        return self._grads

