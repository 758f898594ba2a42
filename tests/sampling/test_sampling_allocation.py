"""Allocation policies against hand-computed values (GVM formula of RLHFlow/GVM, Neyman, temperature, rounding)."""

import math

import pytest
import torch

from lightning_convergence.sampling import (
    allocate_budget,
    allocation_ratios,
    cooldown_temperature,
    gvm_scores,
    integerize_preserve_sum,
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
