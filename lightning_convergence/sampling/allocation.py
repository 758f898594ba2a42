"""Sampling-budget allocation across data groups: GVM, minimum variance, Neyman, uniform and temperature (cooldown).

A *group* is any partition of the training set (class labels, domains, clients, prompts). Given a budget of
``total`` draws per window, every policy returns non-negative integer counts ``n_i`` with ``Σ n_i = total``.

Policies (``π_i = N_i / N`` is group ``i``'s share of the data, i.e. of the uniform objective):

* ``uniform``: ``n_i ∝ N_i`` — what uniform sampling over examples draws in expectation.
* ``gvm``: ``n_i ∝ π_i · G_i / sqrt(p_i + α / p_i^(β−1))`` (``0`` where ``G_i = 0`` or ``p_i = 0``).
  Yao, Hao, Zhang, Dong, Xiong, Jiang, Zhang. *Optimizing Chain-of-Thought Reasoners via Gradient Variance
  Minimization in Rejection Sampling and RL* (GVM-RAFT), NeurIPS 2025, arXiv:2505.02391; the official code
  (RLHFlow/GVM, ``em/stage_2_calc_sample_size.py``) computes ``r_i = G_i / sqrt(p_i + α/p_i^(β−1))`` with
  ``α = 1e-3``, ``β = 2`` and ``n_i = N · r_i / Σ_j r_j``. ``G_i`` is the group's mean per-example gradient norm and
  ``p_i`` its acceptance rate (1 when nothing is filtered).
* ``min_variance``: ``n_i ∝ π_i · sqrt(M_i)`` with ``M_i = E‖∇f_x‖²`` over group ``i`` (the rms per-example gradient
  norm). The minimiser of the variance of the batches :class:`GroupBudgetSampler` delivers: a batch is a shuffled
  share of a window, so each draw is from group ``i`` with probability ``q_i = n_i/n`` and the importance-weighted
  per-example gradient ``(π_i/q_i)∇f_x`` has trace covariance ``Σ_i π_i² M_i / q_i − ‖∇F‖²``, minimised under
  ``Σ q_i = 1`` by ``q_i ∝ π_i sqrt(M_i)`` (Cauchy–Schwarz). Equal to ``gvm`` with the rms statistic and no filter.
* ``neyman``: ``n_i ∝ π_i · σ_i`` with ``σ_i² = tr Cov(∇f_x | x ∈ group i)`` the within-group per-example
  gradient variance. Neyman. *On the Two Different Aspects of the Representative Method.* JRSS 97(4), 1934: for
  the *stratified* estimator ``Σ_i π_i ḡ_i`` (``ḡ_i`` the mean of exactly ``n_i`` draws from group ``i``) the variance
  ``Σ_i π_i² σ_i² / n_i`` is minimised under ``Σ n_i = n`` by ``n_i ∝ π_i σ_i``. Only a whole window is stratified
  that way; the batches inside it are not, and Neyman ignores the spread of the group means ``ḡ_i``: with two equal
  groups of means ±10 and σ 0.1 / 1 it has about 3× uniform's per-batch variance (tested). Use it when the group
  means are close (then ``M_i ≈ σ_i²`` and it matches ``min_variance``) or when one optimizer step spans a window.
* ``temperature``: ``n_i ∝ N_i^(1/T)``; ``T = 1`` is ``uniform``, ``T → ∞`` gives every group the same budget.
  Li, Xu, Tan, Murray, Khashabi. *Upsample or Upweight? Balanced Training on Heavily Imbalanced Datasets.*
  NAACL 2025, arXiv:2410.04579 ("Cooldown": start with a high temperature, lower it during training).
  The exact schedule shape is ours: :func:`cooldown_temperature` (linear or cosine from ``T_start`` to ``T_end``).

Deviation from GVM: the paper allocates per prompt, every prompt weighing the same in the objective; for groups of
unequal size we multiply by ``π_i`` (the same derivation with a weighted objective). With equal group sizes this
factor cancels and the allocation is exactly the paper's (tested).

Integerisation (:func:`integerize_preserve_sum`) is the official code's ``float_to_int_preserve_sum``: round, then fix
the sum by ±1 on the entries with the largest rounding residuals. A floor ``min_per_group`` keeps every non-empty
group drawable, which the importance-weighted estimator needs to stay unbiased.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_convergence._checks import check_choice, check_int_at_least, check_number

__all__ = [
    "POLICIES",
    "allocate_budget",
    "allocation_ratios",
    "cooldown_temperature",
    "gvm_scores",
    "integerize_preserve_sum",
]

POLICIES = ("gvm", "min_variance", "neyman", "uniform", "temperature")

_Vec = Sequence[float] | Tensor


def _vec(x: _Vec, name: str, k: int | None = None) -> Tensor:
    t = torch.as_tensor(x, dtype=torch.float64).flatten().clone()
    if k is not None and t.numel() != k:
        raise ValueError(f"allocate_budget: `{name}` must have one entry per group ({k}), got {t.numel()}.")
    if not torch.isfinite(t).all() or (t < 0).any():
        raise ValueError(f"allocate_budget: `{name}` must be finite and >= 0, got {t.tolist()}.")
    return t


def gvm_scores(grad_norms: _Vec, accept_rates: _Vec, alpha: float = 1e-3, beta: float = 2.0) -> Tensor:
    """GVM's ``r_i = G_i / sqrt(p_i + α / p_i^(β−1))`` (``0`` where ``G_i = 0`` or ``p_i = 0``), float64."""
    g = _vec(grad_norms, "grad_norms")
    p = _vec(accept_rates, "accept_rates", g.numel())
    if (p > 1).any():
        raise ValueError(f"gvm_scores: `accept_rates` must be in [0, 1], got {p.tolist()}.")
    ok = (g > 0) & (p > 0)
    safe_p = torch.where(ok, p, torch.ones_like(p))
    r = g / torch.sqrt(safe_p + alpha / safe_p ** (beta - 1.0))
    return torch.where(ok, r, torch.zeros_like(r))


def integerize_preserve_sum(values: _Vec, total: int) -> Tensor:
    """Round ``values`` (which should sum to ``total``) to integers summing exactly to ``total``.

    Round to nearest; if the sum is short by ``d``, add 1 to the ``d`` entries with the largest residual
    ``value − rounded``; if it exceeds by ``d``, subtract 1 from the ``d`` entries with the smallest residual (never
    below 0). Ties go to the lower index (stable sort), so the result is deterministic.
    """
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    n = torch.round(v)
    resid = v - n
    diff = int(total - int(n.sum().item()))
    if diff > 0:
        order = torch.sort(-resid, stable=True).indices
        n[order[:diff]] += 1
    elif diff < 0:
        order = torch.sort(torch.where(n > 0, resid, torch.full_like(resid, math.inf)), stable=True).indices
        n[order[:-diff]] -= 1
    return n.long()


def cooldown_temperature(
    step: int, start_temperature: float, end_temperature: float = 1.0, start_step: int = 0,
    cooldown_steps: int = 0, shape: str = "linear",
) -> float:
    """Temperature at ``step``: ``start_temperature`` until ``start_step``, then down to ``end_temperature`` over
    ``cooldown_steps`` steps (``linear`` or ``cosine``), then constant. ``cooldown_steps = 0`` jumps at
    ``start_step``. (The schedule shape is ours; Li et al. 2025 only fix its direction.)"""
    check_choice("cooldown_temperature", "shape", shape, ("linear", "cosine"))
    if step < start_step:
        return float(start_temperature)
    if cooldown_steps <= 0 or step >= start_step + cooldown_steps:
        return float(end_temperature)
    frac = (step - start_step) / cooldown_steps
    if shape == "cosine":
        frac = 0.5 * (1.0 - math.cos(math.pi * frac))
    return float(start_temperature + (end_temperature - start_temperature) * frac)


def allocation_ratios(
    policy: str,
    group_sizes: _Vec,
    *,
    grad_norms: _Vec | None = None,
    grad_stds: _Vec | None = None,
    accept_rates: _Vec | None = None,
    temperature: float = 1.0,
    alpha: float = 1e-3,
    beta: float = 2.0,
    grad_rms: _Vec | None = None,
) -> Tensor:
    """Each group's share of the budget (float64, sums to 1) under ``policy``; see the module docstring.

    Falls back to ``uniform`` when the policy's scores are all zero (no statistics yet). Empty groups get 0.

    Raises:
        ValueError: for an unknown policy, a missing statistic, mismatched lengths, negative or non-finite values,
            ``temperature`` ≤ 0, or all groups empty.
    """
    check_choice("allocate_budget", "policy", policy, POLICIES)
    sizes = _vec(group_sizes, "group_sizes")
    k = sizes.numel()
    if sizes.sum() <= 0:
        raise ValueError("allocate_budget: `group_sizes` are all zero; nothing to sample.")
    share = sizes / sizes.sum()
    if policy == "uniform":
        scores = share
    elif policy == "temperature":
        check_number("allocate_budget", "temperature", temperature, 0, low_open=True)
        scores = torch.where(sizes > 0, share ** (1.0 / float(temperature)), torch.zeros_like(share))
    elif policy == "gvm":
        if grad_norms is None:
            raise ValueError("allocate_budget: policy 'gvm' needs `grad_norms` (G_i).")
        p = torch.ones(k, dtype=torch.float64) if accept_rates is None else _vec(accept_rates, "accept_rates", k)
        scores = share * gvm_scores(_vec(grad_norms, "grad_norms", k), p, alpha, beta)
    elif policy == "min_variance":
        if grad_rms is None:
            raise ValueError("allocate_budget: policy 'min_variance' needs `grad_rms` (sqrt(M_i)).")
        scores = share * _vec(grad_rms, "grad_rms", k)
    else:  # neyman
        if grad_stds is None:
            raise ValueError("allocate_budget: policy 'neyman' needs `grad_stds` (σ_i).")
        scores = share * _vec(grad_stds, "grad_stds", k)
    if scores.sum() <= 0:
        scores = share
    return scores / scores.sum()


def allocate_budget(
    policy: str,
    total: int,
    group_sizes: _Vec,
    *,
    grad_norms: _Vec | None = None,
    grad_stds: _Vec | None = None,
    accept_rates: _Vec | None = None,
    temperature: float = 1.0,
    alpha: float = 1e-3,
    beta: float = 2.0,
    min_per_group: int = 0,
    grad_rms: _Vec | None = None,
) -> Tensor:
    """Integer draws per group, summing to ``total``, under ``policy``.

    Args:
        policy: ``"gvm"``, ``"min_variance"``, ``"neyman"``, ``"uniform"`` or ``"temperature"``.
        total: draws to allocate (the paper's N), ≥ 0.
        group_sizes: ``N_i``, examples per group.
        grad_norms: ``G_i``, mean per-example gradient norm per group (``gvm``).
        grad_stds: ``σ_i``, within-group per-example gradient standard deviation (``neyman``).
        grad_rms: ``sqrt(M_i)``, rms per-example gradient norm per group (``min_variance``).
        accept_rates: ``p_i`` in [0, 1] (``gvm``; default all 1: no filtering).
        temperature: ``T`` > 0 (``temperature``).
        alpha: GVM's α ≥ 0, default ``1e-3`` (paper/code). Larger values penalise low-acceptance groups more.
        beta: GVM's β, default ``2.0`` (paper/code).
        min_per_group: floor for every non-empty group, ≥ 0; given first, the rest is allocated by the policy.
            Use ≥ 1 with importance weights (a group never drawn makes the weighted estimator biased).

    Returns:
        ``int64`` tensor of counts, one per group, summing to ``total``.

    Raises:
        ValueError: as :func:`allocation_ratios`, or if ``total`` < 0 or the floors exceed ``total``.
    """
    check_int_at_least("allocate_budget", "total", total, 0)
    check_int_at_least("allocate_budget", "min_per_group", min_per_group, 0)
    ratios = allocation_ratios(
        policy, group_sizes, grad_norms=grad_norms, grad_stds=grad_stds, accept_rates=accept_rates,
        temperature=temperature, alpha=alpha, beta=beta, grad_rms=grad_rms,
    )
    floors = (torch.as_tensor(group_sizes, dtype=torch.float64).flatten() > 0).long() * int(min_per_group)
    rest = int(total) - int(floors.sum())
    if rest < 0:
        raise ValueError(
            f"allocate_budget: `min_per_group` × non-empty groups = {int(floors.sum())} exceeds `total` = {total}."
        )
    return floors + integerize_preserve_sum(rest * ratios, rest)
