"""The importance-weighted estimator is unbiased for the full-data gradient (exactly, and over seeded draws)."""

import pytest
import torch
from torch.utils.data import TensorDataset

from lightning_convergence.sampling import (
    GroupBudgetSampler,
    allocate_budget,
    effective_sample_size,
    effective_sample_size_sum,
    importance_weights,
    weighted_estimator_variance,
)
from lightning_convergence.stats import per_sample_grads


def _problem():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(24, 3, generator=gen)
    groups = torch.tensor([0] * 14 + [1] * 7 + [2] * 3)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + (groups.float() * 3.0) * torch.randn(24, generator=gen)
    model = torch.nn.Linear(3, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    grads = per_sample_grads(model, lambda out, t: 0.5 * (out.squeeze(-1) - t).pow(2).mean(), x, y)["weight"]
    return x, y, groups, grads.reshape(24, -1).double()


def test_weights_formula():
    w = importance_weights([6, 3, 1, 0], [2, 4, 2, 0])  # π = [.6, .3, .1, 0], q = [.25, .5, .25, 0]
    assert w.tolist() == pytest.approx([2.4, 0.6, 0.4, 0.0])
    with pytest.raises(ValueError, match="no draws"):
        importance_weights([6, 3, 1], [4, 4, 0])
    assert effective_sample_size(torch.ones(8)) == pytest.approx(8.0)
    assert effective_sample_size(torch.tensor([1.0, 0.0])) == pytest.approx(1.0)
    # The vectorised sum over batches of different sizes equals the per-batch sum (and 0 for an all-zero batch).
    batches = [torch.tensor([2.4, 0.6, 0.6]), torch.ones(5), torch.tensor([0.4, 2.4]), torch.zeros(2)]
    assert effective_sample_size_sum(batches) == pytest.approx(sum(effective_sample_size(b) for b in batches))
    assert effective_sample_size_sum([]) == 0.0


def test_weighted_estimator_is_exactly_unbiased_by_enumeration():
    _, _, groups, grads = _problem()
    full = grads.mean(dim=0)
    sizes = torch.bincount(groups)
    counts = torch.tensor([2, 5, 9])  # far from proportional (14:7:3)
    w = importance_weights(sizes, counts)
    # One position of a shuffled window: group i with probability n_i/n, then a uniform member of the group.
    q = counts.double() / counts.sum()
    expectation = sum(q[g] * w[g] * grads[groups == g].mean(dim=0) for g in range(3))
    torch.testing.assert_close(expectation, full, rtol=1e-12, atol=1e-12)
    unweighted = sum(q[g] * grads[groups == g].mean(dim=0) for g in range(3))
    assert (unweighted - full).norm() > 0.1 * full.norm()  # without weights the estimate is biased


def test_weighted_batches_from_the_sampler_average_to_the_full_gradient():
    x, _, groups, grads = _problem()
    full = grads.mean(dim=0)
    ds = TensorDataset(x)
    sampler = GroupBudgetSampler(ds, groups, window_size=16, counts=[3, 5, 8], seed=1)
    weighted, plain = [], []
    for epoch in range(400):
        sampler.set_epoch(epoch)
        idx = torch.tensor(list(sampler))
        wts = sampler.pop_weights(idx.numel()).double()
        for b in range(0, idx.numel(), 8):  # batches of 8
            weighted.append((wts[b : b + 8, None] * grads[idx[b : b + 8]]).mean(dim=0))
            plain.append(grads[idx[b : b + 8]].mean(dim=0))
    weighted, plain = torch.stack(weighted), torch.stack(plain)
    se = weighted.std(dim=0) / weighted.shape[0] ** 0.5
    # 800 batch estimates: the mean must lie within 4 standard errors of the full gradient on every coordinate
    # (false-alarm probability < 1e-4 per coordinate; the seed is fixed so this is deterministic anyway).
    assert ((weighted.mean(dim=0) - full).abs() <= 4 * se).all()
    # The unweighted mean misses by far more than that: the test can fail.
    assert ((plain.mean(dim=0) - full).abs() > 10 * se).any()


def test_variance_formula_reduces_to_plain_variance_under_uniform_sampling():
    _, _, groups, grads = _problem()
    sizes = torch.bincount(groups).double()
    pi = sizes / sizes.sum()
    m = torch.stack([grads[groups == g].pow(2).sum(dim=1).mean() for g in range(3)])
    full_sq = float(grads.mean(dim=0).pow(2).sum())
    plain = float(grads.var(dim=0, unbiased=False).sum())
    assert weighted_estimator_variance(pi, pi, m, full_sq) == pytest.approx(plain, rel=1e-10)
    # The optimum q ∝ π sqrt(M) never does worse than uniform (Cauchy–Schwarz).
    q = pi * m.sqrt()
    assert weighted_estimator_variance(pi, q / q.sum(), m, full_sq) <= plain
    counts = allocate_budget("gvm", 100, sizes, grad_norms=m.sqrt(), min_per_group=1)
    assert weighted_estimator_variance(pi, counts / 100.0, m, full_sq) < plain
