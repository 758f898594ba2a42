"""Per-group running statistics for budget allocation: gradient norms, variances and acceptance rates (EMAs).

For every group ``i`` it keeps bias-corrected exponential moving averages (Adam-style, one count per group, so a
group seen rarely is not pulled towards 0) of

* ``grad_norm``   — ``G_i = E‖∇f_x‖`` over examples of the group (GVM's statistic),
* ``grad_sq``     — ``M_i = E‖∇f_x‖²`` (second moment; for the importance-sampling variance),
* ``grad_var``    — ``σ_i² = tr Cov(∇f_x)`` within the group (Neyman's statistic; Bessel-corrected),
* ``accept_rate`` — ``p_i``, the share of generated candidates that pass the filter (generate-and-filter training;
  1 until something is recorded),

and one global ``full_grad_sq`` ≈ ``‖∇F‖²`` of the uniform objective. Norms come from per-example gradients through
:mod:`lightning_convergence.stats`; the within-group variance is assembled from per-group sums with the
Bessel-corrected formula of ``stats.sample_grad_stats`` (equal to it per group, tested), in one pass for all groups.
Non-finite gradients are skipped and counted in ``nonfinite_skipped_total``. Torch only: no ``lightning`` import.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_convergence._checks import check_choice, check_int_at_least, check_number
from lightning_convergence.stats import sq_norm
from lightning_convergence.stats.per_sample_norms import per_sample_sq_norms

__all__ = ["GroupStats"]

_FIELDS = ("grad_norm", "grad_sq", "grad_var", "accept_rate")


class GroupStats:
    """Running per-group gradient statistics (see module docstring).

    Args:
        num_groups: number of groups K, ≥ 1.
        beta: EMA factor in [0, 1). Default ``0.9``. 0 keeps the latest measurement only; closer to 1 smooths over
            more measurements (probes are infrequent, so 0.9 already averages ~10 of them).

    State: per-field EMA sums and per-group counts (float64 tensors), ``full_grad_sq`` EMA, the non-finite skip
    counter and ``version``.

    Raises:
        ValueError: for ``num_groups`` < 1 or ``beta`` outside [0, 1). TypeError: a non-int ``num_groups``.

    Example::

        gs = GroupStats(3)
        gs.update_grads(torch.tensor([0, 0, 1, 2]), per_sample_grads(model, loss_fn, x, y).values(),
                        group_weights=torch.tensor([0.5, 0.25, 0.25]))
        gs.value("grad_norm")
    """

    STATE_VERSION = 1

    def __init__(self, num_groups: int, beta: float = 0.9) -> None:
        self.num_groups = check_int_at_least("GroupStats", "num_groups", num_groups, 1)
        self.beta = check_number("GroupStats", "beta", beta, 0, 1, high_open=True)
        self._avg = {f: torch.zeros(self.num_groups, dtype=torch.float64) for f in _FIELDS}
        self._count = {f: torch.zeros(self.num_groups, dtype=torch.float64) for f in _FIELDS}
        self._full = torch.zeros(2, dtype=torch.float64)  # [ema sum, count] of ‖∇F‖²
        self.nonfinite_skipped_total = 0

    # -- updates ------------------------------------------------------------------------------------------------
    def _ema(self, field: str, groups: Tensor, values: Tensor) -> None:
        avg, cnt = self._avg[field], self._count[field]
        avg[groups] = self.beta * avg[groups] + (1.0 - self.beta) * values.double()
        cnt[groups] += 1

    def update_grads(
        self, group_ids: Tensor, samples: Sequence[Tensor], group_weights: Tensor | None = None
    ) -> bool:
        """Fold one probe of per-example gradients into the statistics.

        Args:
            group_ids: ``[n]`` int group of each example.
            samples: one ``[n, *param_shape]`` tensor per parameter (row ``j`` = example ``j``'s gradient).
            group_weights: ``[K]`` share ``π_i`` of each group in the objective; when given, ``full_grad_sq`` is
                updated with ``‖Σ_i π_i ḡ_i‖²`` over the groups present.

        Returns:
            ``False`` if the probe held non-finite gradients (then nothing is updated), else ``True``.
        """
        samples = list(samples)
        group_ids = torch.as_tensor(group_ids, dtype=torch.long).flatten().cpu()
        if not samples or group_ids.numel() != samples[0].shape[0]:
            raise ValueError("GroupStats: `group_ids` must have one entry per row of `samples`.")
        # One pass for all groups (no per-group Python loop): a float64 [n, D] matrix once (the Bessel formula below
        # cancels heavily in float32), group sums as one matrix product with the [groups present, n] membership.
        present, local = torch.unique(group_ids, return_inverse=True)
        n = group_ids.numel()
        flat = torch.cat([s.reshape(n, -1) for s in samples], dim=1).double()
        member = torch.zeros(present.numel(), n, dtype=torch.float64, device=flat.device)
        member[local.to(flat.device), torch.arange(n, device=flat.device)] = 1.0
        count = member.sum(dim=1)
        sq = per_sample_sq_norms([flat])
        # A NaN or inf anywhere makes its row's float64 squared norm non-finite (float32 squares cannot overflow in
        # float64), so this replaces a separate pass over the gradients.
        if not bool(torch.isfinite(sq).all()):
            self.nonfinite_skipped_total += 1
            return False
        means = (member @ flat) / count[:, None]
        sum_sq = (member @ sq).cpu()
        count = count.cpu()
        self._ema("grad_norm", present, (member @ sq.sqrt()).cpu() / count)
        self._ema("grad_sq", present, sum_sq / count)
        multi = count >= 2  # a variance needs two rows; Bessel-corrected tr Cov = (Σ‖g‖² − n‖ḡ‖²) / (n − 1)
        if multi.any():
            mean_sq = per_sample_sq_norms([means]).cpu()
            var = ((sum_sq - count * mean_sq) / (count - 1).clamp_min(1)).clamp_min(0.0)
            self._ema("grad_var", present[multi], var[multi])
        if group_weights is not None:
            w = torch.as_tensor(group_weights, dtype=torch.float64).flatten()[present].to(flat.device)
            self._full[0] = self.beta * self._full[0] + (1.0 - self.beta) * float(sq_norm([w @ means]))
            self._full[1] += 1
        return True

    def update_acceptance(self, accepted: Tensor, generated: Tensor) -> None:
        """Fold acceptance counts per group (``[K]`` each); groups with nothing generated are left unchanged."""
        accepted = torch.as_tensor(accepted, dtype=torch.float64).flatten().cpu()
        generated = torch.as_tensor(generated, dtype=torch.float64).flatten().cpu()
        if accepted.numel() != self.num_groups or generated.numel() != self.num_groups:
            raise ValueError(f"GroupStats: acceptance counts must have {self.num_groups} entries.")
        if (accepted < 0).any() or (accepted > generated).any():
            raise ValueError("GroupStats: need 0 <= `accepted` <= `generated` per group.")
        seen = (generated > 0).nonzero().flatten()
        if seen.numel():
            self._ema("accept_rate", seen, accepted[seen] / generated[seen])

    # -- reads --------------------------------------------------------------------------------------------------
    def value(self, field: str, default: float = 0.0) -> Tensor:
        """Bias-corrected EMA per group (``[K]`` float64); ``default`` for groups never measured."""
        check_choice("GroupStats", "field", field, _FIELDS)
        cnt = self._count[field]
        corr = 1.0 - self.beta ** cnt
        out = torch.full_like(cnt, float(default))
        seen = cnt > 0
        out[seen] = self._avg[field][seen] / corr[seen]
        return out

    def measured(self, field: str) -> Tensor:
        """``[K]`` bool: which groups have at least one measurement of ``field``."""
        return self._count[field] > 0

    @property
    def full_grad_sq(self) -> float:
        """Bias-corrected EMA of ``‖∇F‖²`` (0 before any measurement)."""
        if self._full[1] == 0:
            return 0.0
        return float(self._full[0] / (1.0 - self.beta ** self._full[1]))

    # -- state --------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": self.STATE_VERSION,
            "avg": {f: t.clone() for f, t in self._avg.items()},
            "count": {f: t.clone() for f, t in self._count.items()},
            "full": self._full.clone(),
            "nonfinite_skipped_total": self.nonfinite_skipped_total,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != self.STATE_VERSION:
            raise RuntimeError(f"GroupStats: state `version` {state.get('version')!r} is not {self.STATE_VERSION}.")
        if state["avg"]["grad_norm"].numel() != self.num_groups:
            raise ValueError(
                f"GroupStats: checkpoint has {state['avg']['grad_norm'].numel()} groups, this instance "
                f"`num_groups` = {self.num_groups}."
            )
        self._avg = {f: state["avg"][f].clone().double() for f in _FIELDS}
        self._count = {f: state["count"][f].clone().double() for f in _FIELDS}
        self._full = state["full"].clone().double()
        self.nonfinite_skipped_total = int(state["nonfinite_skipped_total"])
