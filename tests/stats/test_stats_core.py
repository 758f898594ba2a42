"""The gradient-statistics core against hand-computed values and a problem whose noise is known."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_convergence import stats
from tests.helpers.dist import run_processes


def test_norms_hand_computed():
    ts = [torch.tensor([3.0, 4.0]), torch.tensor([[0.0, -12.0]])]
    assert stats.l2_norm(ts).item() == pytest.approx(13.0)
    assert stats.sq_norm(ts).item() == pytest.approx(169.0)
    assert stats.l1_norm(ts).item() == pytest.approx(19.0)
    assert stats.per_tensor_norms(ts, 2.0).tolist() == pytest.approx([5.0, 12.0])
    assert stats.inner(ts, ts).item() == pytest.approx(169.0)


def test_all_finite_flags_nan_and_inf_but_not_large_values():
    assert stats.all_finite([torch.tensor([1e30, -1e30])])  # squared, this would overflow float32
    assert not stats.all_finite([torch.tensor([1.0, float("nan")])])
    assert not stats.all_finite([torch.tensor([1.0]), torch.tensor([float("-inf")])])


def test_sample_grad_stats_hand_computed():
    # Samples (1,0), (0,1), (2,2): mean (1,1), |g|^2 = 2; per-coordinate unbiased variances 1 and 1, trace 2;
    # <x_i, mean> = 1, 1, 4 with unbiased variance 3; orthogonal trace = 2 - 3/2.
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    s = stats.sample_grad_stats([x[:, :1], x[:, 1:]])
    assert (s.count, s.grad_sq_norm, s.trace_cov, s.inner_var) == (3, pytest.approx(2.0), pytest.approx(2.0),
                                                                   pytest.approx(3.0))
    assert s.orthogonal_trace == pytest.approx(0.5)
    scaled = stats.sample_grad_stats([x], scale=4)
    assert scaled.trace_cov == pytest.approx(8.0) and scaled.inner_var == pytest.approx(12.0)


def test_sample_grad_stats_rejects_bad_input():
    with pytest.raises(ValueError, match="`samples`"):
        stats.sample_grad_stats([])
    with pytest.raises(ValueError, match="`scale`"):
        stats.sample_grad_stats([torch.zeros(3, 2)], scale=0)
    with pytest.raises(ValueError, match="at least 2 samples"):
        stats.sample_grad_stats([torch.zeros(1, 2)])


def _distributed_stats(rank: int, world_size: int, data: torch.Tensor, split: int):
    import torch.distributed as dist

    part = data[:split] if rank == 0 else data[split:]
    s = stats.sample_grad_stats([part[:, :3], part[:, 3:]], all_reduce=lambda t: dist.all_reduce(t))
    return s


def test_distributed_reduction_is_the_law_of_total_variance():
    """Two ranks with unequal sample counts reproduce the statistics of the pooled samples exactly."""
    g = torch.Generator().manual_seed(0)
    data = torch.randn(11, 5, generator=g) * torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0]) + 0.7
    pooled = stats.sample_grad_stats([data[:, :3], data[:, 3:]])
    r0, r1 = run_processes(_distributed_stats, 2, data, 4)
    for r in (r0, r1):
        assert r.count == 11
        assert r.trace_cov == pytest.approx(pooled.trace_cov, rel=1e-9)
        assert r.grad_sq_norm == pytest.approx(pooled.grad_sq_norm, rel=1e-9)
        assert r.inner_var == pytest.approx(pooled.inner_var, rel=1e-9)


def test_per_sample_grads_match_autograd_loop():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    got = stats.per_sample_grads(model, torch.nn.functional.cross_entropy, x, y)
    for i in range(5):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(got[name][i], p.grad)


def test_estimate_noise_is_unbiased_in_closed_form():
    # E|G_B|^2 = |G|^2 + tr/B exactly; feeding expectations must return the truth.
    g2, tr = 4.0, 50.0
    est = stats.estimate_noise(g2 + tr / 8, g2 + tr / 64, 8, 64)
    assert est.grad_sq_norm == pytest.approx(g2) and est.trace_cov == pytest.approx(tr)
    assert est.noise_scale == pytest.approx(12.5)
    with pytest.raises(ValueError, match="`b_small`"):
        stats.estimate_noise(1.0, 1.0, 8, 8)


def test_noise_scale_within_ten_percent_on_known_noise():
    """Per-example gradients G + N(0, diag(s^2)): B_simple = sum(s^2)/|G|^2 is known; the estimate is within 10%."""
    gen = torch.Generator().manual_seed(1)
    d = 50
    G = torch.linspace(-1, 1, d)
    s = torch.linspace(0.5, 3.0, d)
    true_b = (s**2).sum().item() / G.pow(2).sum().item()
    tracker = stats.GradientNoiseScale(beta=0.99)
    b_small, n_small = 4, 8  # 8 "ranks" of 4 examples: b_big = 32
    for _ in range(1500):
        per_example = G + s * torch.randn(b_small * n_small, d, generator=gen)
        small = per_example.reshape(n_small, b_small, d).mean(1)
        big = per_example.mean(0)
        sq_small = small.pow(2).sum(1).mean()
        tracker.update(stats.estimate_noise(sq_small, big.pow(2).sum(), b_small, b_small * n_small))
    assert math.isclose(tracker.noise_scale, true_b, rel_tol=0.10), (tracker.noise_scale, true_b)
    # State round-trips exactly.
    clone = stats.GradientNoiseScale(beta=0.99)
    clone.load_state_dict(tracker.state_dict())
    assert clone.noise_scale == tracker.noise_scale


def test_sample_stats_trace_matches_known_covariance():
    gen = torch.Generator().manual_seed(2)
    s = torch.tensor([1.0, 2.0, 3.0])
    x = 0.5 + s * torch.randn(20000, 3, generator=gen)
    out = stats.sample_grad_stats([x])
    assert out.trace_cov == pytest.approx(14.0, rel=0.03)  # 3 sigma of the sample variance at n=20000 is ~2%


def test_bias_corrected_ema():
    ema = stats.BiasCorrectedEMA(0.9)
    assert math.isnan(ema.value)
    assert ema.update(5.0) == pytest.approx(5.0)  # bias correction makes the first value exact
    assert ema.update(5.0) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="`beta`"):
        stats.BiasCorrectedEMA(1.0)
