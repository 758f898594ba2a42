"""Budget allocation across data groups (GVM, Neyman, uniform, temperature/cooldown), per-group gradient statistics,
importance weights and the distributed group-budget sampler. Torch only: no ``lightning`` import."""

from lightning_convergence.sampling.allocation import (
    POLICIES,
    allocate_budget,
    allocation_ratios,
    cooldown_temperature,
    gvm_scores,
    integerize_preserve_sum,
)
from lightning_convergence.sampling.checks import check_sampling_args
from lightning_convergence.sampling.group_stats import GroupStats
from lightning_convergence.sampling.groups import resolve_groups
from lightning_convergence.sampling.sampler import GroupBudgetSampler
from lightning_convergence.sampling.weights import (
    effective_sample_size,
    effective_sample_size_sum,
    importance_weights,
    weighted_estimator_variance,
)

__all__ = [
    "POLICIES",
    "GroupBudgetSampler",
    "GroupStats",
    "allocate_budget",
    "allocation_ratios",
    "check_sampling_args",
    "cooldown_temperature",
    "effective_sample_size",
    "effective_sample_size_sum",
    "gvm_scores",
    "importance_weights",
    "integerize_preserve_sum",
    "resolve_groups",
    "weighted_estimator_variance",
]
