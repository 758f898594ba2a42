"""Allocation policies against hand-computed values (GVM formula of RLHFlow/GVM, Neyman, temperature, rounding) and
the minimum-variance policy against the variance of the batches the sampler really draws."""

import math

import pytest
import torch
from torch.utils.data import TensorDataset

from lightning_convergence.sampling import (
    GroupBudgetSampler,
    allocate_budget,
    allocation_ratios,
    cooldown_temperature,
    gvm_scores,
    integerize_preserve_sum,
    weighted_estimator_variance,
)


def test_gvm_matches_formula_on_hand_set_statistics():
    g, p = [1.0, 2.0, 3.0, 0.0], [0.5, 1.0, 0.1, 0.7]
    # r_i = G_i / sqrt(p_i + 1e-3 / p_i), by hand: 1/sqrt(0.502), 2/sqrt(1.001), 3/sqrt(0.11), 0 (G = 0).
    r = gvm_scores(g, p)
    expected = [1.0 / math.sqrt(0.502), 2.0 / math.sqrt(1.001), 3.0 / math.sqrt(0.11), 0.0]
    assert r.tolist() == pytest.approx(expected, rel=1e-12)
    assert r.tolist() == pytest.approx([1.41139, 1.99900, 9.04534, 0.0], abs=1e-5)
    # Equal group sizes: the size factor cancels and n_i = N r_i / Σ r_j exactly as in the paper's code.
    counts = allocate_budget("gvm", 100, [5, 5, 5, 5], grad_norms=g, accept_rates=p)
    # 100 · r / Σr = [11.331, 16.049, 72.620, 0] -> rounded [11, 16, 73, 0], sum already 100.
    assert counts.tolist() == [11, 16, 73, 0]
    assert int(counts.sum()) == 100


def test_gvm_zero_acceptance_gets_nothing_and_beta_is_used():
    r = gvm_scores([1.0, 1.0], [0.0, 0.25], alpha=0.5, beta=3.0)
    # p = 0 -> 0; p = 0.25: 1 / sqrt(0.25 + 0.5 / 0.25**2) = 1 / sqrt(8.25).
    assert r.tolist() == pytest.approx([0.0, 1.0 / math.sqrt(8.25)], rel=1e-12)


def test_gvm_with_unequal_sizes_multiplies_by_group_share():
    ratios = allocation_ratios("gvm", [30, 10], grad_norms=[1.0, 3.0])  # p = 1: r ∝ G, times π = [0.75, 0.25]
    assert ratios.tolist() == pytest.approx([0.5, 0.5])


def test_integerize_preserves_sum_by_largest_residuals():
    # Rounds to [3, 3, 3] = 9 > 8: subtract 1 where the residual (value − rounded) is smallest: index 0 (tie -> first).
    assert integerize_preserve_sum([2.6, 2.6, 2.8], 8).tolist() == [2, 3, 3]
    # Rounds to [1, 1, 1] = 3 < 4: add 1 where the residual is largest: index 0 (0.4, tie -> first).
    assert integerize_preserve_sum([1.4, 1.4, 1.2], 4).tolist() == [2, 1, 1]
    gen = torch.Generator().manual_seed(0)
    for total in (1, 7, 64, 1000):
        ratios = torch.rand(9, generator=gen, dtype=torch.float64)
        ratios /= ratios.sum()
        n = integerize_preserve_sum(total * ratios, total)
        assert int(n.sum()) == total and (n >= 0).all()
        assert (n.double() - total * ratios).abs().max() < 1.0


def test_neyman_uniform_and_min_per_group():
    # n ∝ π σ: π = [0.5, 0.25, 0.25], σ = [1, 4, 0] -> [0.5, 1, 0] / 1.5.
    assert allocation_ratios("neyman", [2, 1, 1], grad_stds=[1.0, 4.0, 0.0]).tolist() == pytest.approx(
        [1 / 3, 2 / 3, 0.0]
    )
    assert allocate_budget("uniform", 10, [6, 3, 1]).tolist() == [6, 3, 1]
    # Floors first (1 each), the remaining 7 by σ-share [1/3, 2/3, 0] -> [2.33, 4.67, 0] -> [2, 5, 0].
    assert allocate_budget("neyman", 10, [2, 1, 1], grad_stds=[1.0, 4.0, 0.0], min_per_group=1).tolist() == [3, 6, 1]
    # No statistics yet (all zero): falls back to uniform.
    assert allocate_budget("gvm", 10, [6, 3, 1], grad_norms=[0, 0, 0]).tolist() == [6, 3, 1]


def test_temperature_and_cooldown_schedule():
    sizes = [81, 16, 1]
    assert allocation_ratios("temperature", sizes, temperature=1.0).tolist() == pytest.approx(
        allocation_ratios("uniform", sizes).tolist()
    )
    # T = 2: ∝ sqrt(N_i) = [9, 4, 1] / 14 (the shares' common factor cancels).
    assert allocation_ratios("temperature", sizes, temperature=2.0).tolist() == pytest.approx([9 / 14, 4 / 14, 1 / 14])
    assert cooldown_temperature(0, 5.0, 1.0, start_step=10, cooldown_steps=40) == 5.0
    assert cooldown_temperature(30, 5.0, 1.0, start_step=10, cooldown_steps=40) == pytest.approx(3.0)
    assert cooldown_temperature(50, 5.0, 1.0, start_step=10, cooldown_steps=40) == 1.0
    assert cooldown_temperature(30, 5.0, 1.0, start_step=10, cooldown_steps=40, shape="cosine") == pytest.approx(3.0)
    assert cooldown_temperature(20, 5.0, 1.0, start_step=10, cooldown_steps=40, shape="cosine") == pytest.approx(
        5.0 - 4.0 * 0.5 * (1 - math.cos(math.pi / 4))
    )


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"policy": "gvmm", "total": 4, "group_sizes": [1, 1]}, "policy"),
        ({"policy": "gvm", "total": 4, "group_sizes": [1, 1]}, "grad_norms"),
        ({"policy": "neyman", "total": 4, "group_sizes": [1, 1]}, "grad_stds"),
        ({"policy": "gvm", "total": 4, "group_sizes": [1, 1], "grad_norms": [1.0]}, "grad_norms"),
        ({"policy": "gvm", "total": 4, "group_sizes": [1, 1], "grad_norms": [1, -1]}, "grad_norms"),
        ({"policy": "temperature", "total": 4, "group_sizes": [1, 1], "temperature": 0}, "temperature"),
        ({"policy": "uniform", "total": -1, "group_sizes": [1, 1]}, "total"),
        ({"policy": "uniform", "total": 1, "group_sizes": [1, 1], "min_per_group": 1}, "min_per_group"),
        ({"policy": "uniform", "total": 1, "group_sizes": [0, 0]}, "group_sizes"),
    ],
)
def test_allocation_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        allocate_budget(**kwargs)


def _two_groups():
    """Two equal groups of scalar 'gradients' with means exactly +10 / −10 and spreads exactly 0.1 / 1 (fixed data)."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2, 100, generator=gen, dtype=torch.float64)
    z = (z - z.mean(1, keepdim=True)) / z.std(1, correction=0, keepdim=True)
    a, b = 10 + 0.1 * z[0], -10 + 1.0 * z[1]
    values = torch.cat([a, b])
    groups = torch.tensor([0] * 100 + [1] * 100)
    stats = {
        "grad_stds": [a.std(correction=0).item(), b.std(correction=0).item()],
        "grad_rms": [a.pow(2).mean().sqrt().item(), b.pow(2).mean().sqrt().item()],
    }
    return values, groups, stats


def _batch_variance(policy, values, groups, stats, window=44, batch=11, windows=500):
    """Empirical variance of the importance-weighted batch mean over batches drawn by GroupBudgetSampler."""
    counts = allocate_budget(policy, window, [100, 100], **stats)
    sampler = GroupBudgetSampler(TensorDataset(values), groups, window_size=window, epoch_size=window * windows,
                                 counts=counts, seed=1)
    idx = torch.tensor(list(sampler))
    w = sampler.pop_weights(idx.numel()).double()
    means = (w * values[idx]).reshape(-1, batch).mean(1)
    return means.var().item(), counts


def test_min_variance_beats_uniform_and_neyman_triples_it_on_the_sampler_batches():
    values, groups, stats = _two_groups()
    var = {p: _batch_variance(p, values, groups, stats) for p in ("uniform", "neyman", "min_variance")}
    # Hand computation (π = ½, M = 100.01 / 101, q_neyman = 4/44, 40/44): Σπ²M/q is 100.5 for uniform and
    # 302.8 for Neyman: 3x. 2000 batches: the relative standard error of a variance estimate is about
    # sqrt(2/2000) ≈ 3%, so 2.5x and a 10% margin leave room for noise, never for a swapped order.
    assert var["neyman"][0] > 2.5 * var["uniform"][0]
    assert var["min_variance"][0] < 1.1 * var["uniform"][0]
    assert var["min_variance"][0] < var["neyman"][0] / 2.5
    assert var["min_variance"][1].tolist() == [22, 22]  # q ∝ π·rms: 10.0005 vs 10.05 -> an even split of 44
    assert var["neyman"][1].tolist() == [4, 40]  # q ∝ π·σ: 0.1 vs 1 -> 44/11, 440/11


def test_min_variance_minimises_the_weighted_estimator_variance():
    """q ∝ π·sqrt(M) against a brute-force search of Σπ²M/q over the simplex (two and three groups)."""
    for sizes, m in (([3, 1], [4.0, 9.0]), ([2, 5, 3], [1.0, 16.0, 0.25])):
        pi = torch.tensor(sizes, dtype=torch.float64) / sum(sizes)
        q = allocation_ratios("min_variance", sizes, grad_rms=torch.tensor(m).sqrt())
        best = weighted_estimator_variance(pi, q, torch.tensor(m))
        gen = torch.Generator().manual_seed(0)
        for _ in range(2000):
            other = torch.rand(len(sizes), generator=gen, dtype=torch.float64) + 1e-3
            assert weighted_estimator_variance(pi, other / other.sum(), torch.tensor(m)) >= best - 1e-12
        # Closed form (Cauchy–Schwarz): the minimum is (Σ π_i sqrt(M_i))².
        assert best == pytest.approx(float((pi * torch.tensor(m).sqrt()).sum()) ** 2)
