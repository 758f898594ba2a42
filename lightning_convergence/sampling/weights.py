"""Importance weights that keep group-budget sampling unbiased for the uniform (full-data) objective.

If a window of ``n`` draws holds ``n_i`` from group ``i`` (drawn uniformly inside the group) and is shuffled, any
single position is from group ``i`` with probability ``q_i = n_i/n``. With the weight ``w_i = π_i / q_i``,
``π_i = N_i/N``, the weighted per-example gradient has expectation ``Σ_i q_i · (π_i/q_i) · ḡ_i = Σ_i π_i ḡ_i``, the
full-data gradient — so is any (weighted) mean over a batch of such positions. This is textbook importance sampling
(e.g. Needell, Srebro, Ward, *Stochastic Gradient Descent, Weighted Sampling, and the Randomized Kaczmarz
Algorithm*, NeurIPS 2014, arXiv:1310.5715, Sec. 3); for a group never drawn (``n_i = 0``) no weight can repair the
estimate, hence the ``min_per_group`` floor of the allocation.

Torch only: no ``lightning`` import.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["effective_sample_size", "effective_sample_size_sum", "importance_weights", "weighted_estimator_variance"]


def importance_weights(group_sizes: Sequence[int] | Tensor, counts: Sequence[int] | Tensor) -> Tensor:
    """Per-group weights ``w_i = (N_i/N) / (n_i/n)`` (float64 ``[K]``); 0 for empty groups.

    Args:
        group_sizes: ``N_i``, examples per group.
        counts: ``n_i``, draws per group in the window (the allocation).

    Raises:
        ValueError: if lengths differ, sums are zero, or a non-empty group has no draws (the estimator would be
            biased: use ``allocate_budget(..., min_per_group=1)``).
    """
    sizes = torch.as_tensor(group_sizes, dtype=torch.float64).flatten()
    n = torch.as_tensor(counts, dtype=torch.float64).flatten()
    if sizes.numel() != n.numel():
        raise ValueError(f"importance_weights: `counts` must have {sizes.numel()} entries, got {n.numel()}.")
    if sizes.sum() <= 0 or n.sum() <= 0:
        raise ValueError("importance_weights: `group_sizes` and `counts` must each have a positive sum.")
    starved = ((sizes > 0) & (n <= 0)).nonzero().flatten().tolist()
    if starved:
        raise ValueError(
            f"importance_weights: groups {starved} are non-empty but get no draws; their gradient cannot be "
            "recovered by weighting (allocate with `min_per_group` >= 1)."
        )
    share, q = sizes / sizes.sum(), n / n.sum()
    return torch.where(n > 0, share / q.clamp_min(1e-300), torch.zeros_like(share))


def effective_sample_size(weights: Tensor) -> float:
    """Kish's effective sample size ``(Σ w)² / Σ w²`` of a batch's weights (equals the batch size when all equal)."""
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    den = float(w.pow(2).sum())
    return float(w.sum()) ** 2 / den if den > 0 else 0.0


def effective_sample_size_sum(batches: Sequence[Tensor]) -> float:
    """Sum over ``batches`` (a list of weight vectors, sizes may differ) of each batch's Kish ESS, in one vectorised
    pass: equal to ``sum(effective_sample_size(b) for b in batches)`` without a per-batch cost in the training loop."""
    if not batches:
        return 0.0
    w = torch.cat([torch.as_tensor(b).flatten() for b in batches]).double()
    sizes = torch.tensor([torch.as_tensor(b).numel() for b in batches])
    ids = torch.repeat_interleave(torch.arange(len(batches)), sizes)
    total = torch.zeros(len(batches), dtype=torch.float64).index_add_(0, ids, w)
    square = torch.zeros(len(batches), dtype=torch.float64).index_add_(0, ids, w * w)
    return float(torch.where(square > 0, total * total / square.clamp_min(1e-300), torch.zeros_like(total)).sum())


def weighted_estimator_variance(
    group_shares: Tensor, sampling_probs: Tensor, second_moments: Tensor, full_grad_sq: float = 0.0
) -> float:
    """Per-example trace covariance of the importance-weighted gradient, ``Σ_i π_i² M_i / q_i − ‖∇F‖²``.

    For i.i.d. draws from the group mixture ``q`` with weights ``π_i/q_i`` (``M_i = E‖∇f_x‖²`` in group ``i``). A
    batch of ``B`` such draws has ``1/B`` of it. Groups with ``q_i = 0`` are ignored. Under ``q = π`` it is the
    ordinary per-example gradient variance.
    """
    pi = torch.as_tensor(group_shares, dtype=torch.float64).flatten()
    q = torch.as_tensor(sampling_probs, dtype=torch.float64).flatten()
    m = torch.as_tensor(second_moments, dtype=torch.float64).flatten()
    ok = q > 0
    return float((pi[ok] ** 2 * m[ok] / q[ok]).sum()) - float(full_grad_sq)
