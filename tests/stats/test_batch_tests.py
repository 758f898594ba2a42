"""AdAdaGrad's batch-size tests: hand-computed values, analytic values on least squares, the bounded update."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from lightning_convergence import stats
from lightning_convergence.stats import SampleGradStats


def test_formulas_on_hand_computed_stats():
    s = SampleGradStats(count=10, trace_cov=8.0, grad_sq_norm=2.0, inner_var=3.0)
    # norm: 8 / (0.5² · 2) = 16
    assert stats.norm_test_batch_size(s, eta=0.5) == 16
    # inner product: 3 / (0.5² · 4) = 3
    assert stats.inner_product_test_batch_size(s, theta=0.5) == 3
    # orthogonal trace = 8 − 3/2 = 6.5; 6.5 / (1² · 2) = 3.25 → 4
    assert s.orthogonal_trace == 6.5
    assert stats.orthogonality_test_batch_size(s, nu=1.0) == 4
    assert stats.augmented_test_batch_size(s, theta=0.5, nu=1.0) == 4
    # With θ = 0.1 the inner-product test dominates: 3 / (0.1² · 2²) = 75 > 4.
    assert stats.augmented_test_batch_size(s, theta=0.1, nu=1.0) == 75


def test_degenerate_and_nonfinite_stats():
    zero = SampleGradStats(count=4, trace_cov=1.0, grad_sq_norm=0.0, inner_var=0.0)
    assert stats.norm_test_batch_size(zero, 0.1) == math.inf
    noiseless = SampleGradStats(count=4, trace_cov=0.0, grad_sq_norm=1.0, inner_var=0.0)
    assert stats.norm_test_batch_size(noiseless, 0.1) == 1
    bad = SampleGradStats(count=4, trace_cov=float("nan"), grad_sq_norm=1.0, inner_var=0.0)
    assert math.isnan(stats.norm_test_batch_size(bad, 0.1))
    assert math.isnan(stats.augmented_test_batch_size(bad, 0.1, 0.1))
    with pytest.raises(ValueError, match="`eta`"):
        stats.norm_test_batch_size(noiseless, 0.0)
    with pytest.raises(ValueError, match="`theta`"):
        stats.inner_product_test_batch_size(noiseless, -1.0)
    with pytest.raises(ValueError, match="`nu`"):
        stats.orthogonality_test_batch_size(noiseless, float("inf"))


def _least_squares_grads(n: int, d: int, delta: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    """Per-example gradients of (xᵀw − y)² at w = w* + δ, with x ~ N(0, I), y = xᵀw* + ε, ε ~ N(0, σ²)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    eps = sigma * torch.randn(n, generator=g, dtype=torch.float64)
    r = x @ delta - eps
    return 2 * r.unsqueeze(1) * x


def _analytic(d: int, delta: torch.Tensor, sigma: float) -> dict[str, float]:
    """Closed form: G = 2δ, Σ = 4((‖δ‖² + σ²) I + δδᵀ) (Isserlis' theorem for Gaussian x)."""
    dd = float(delta.pow(2).sum())
    return {
        "grad_sq_norm": 4 * dd,
        "trace_cov": 4 * ((dd + sigma**2) * d + dd),
        "inner_var": 16 * ((dd + sigma**2) * dd + dd**2),  # Gᵀ Σ G
        "orthogonal_trace": 4 * (dd + sigma**2) * (d - 1),
    }


@pytest.mark.parametrize("micro_batch", [1, 8])
def test_statistics_match_analytic_values_on_least_squares(micro_batch):
    """Exact per-sample gradients (scale 1) and micro-batch means (scale b) both recover the closed form."""
    d, sigma, n = 5, 0.5, 64_000
    delta = torch.tensor([1.0, -0.5, 0.25, 0.0, 0.5], dtype=torch.float64)
    grads = _least_squares_grads(n, d, delta, sigma, seed=0)
    samples = grads.reshape(n // micro_batch, micro_batch, d).mean(dim=1)
    s = stats.sample_grad_stats([samples], scale=micro_batch)
    ref = _analytic(d, delta, sigma)
    # Relative sampling error of a fourth-moment estimate over n/b samples is a few /sqrt(n/b): 8000 samples → ~5%.
    # ‖ḡ‖² carries the extra bias tr Σ / n (< 0.1% here).
    assert s.grad_sq_norm == pytest.approx(ref["grad_sq_norm"], rel=0.03)
    assert s.trace_cov == pytest.approx(ref["trace_cov"], rel=0.05)
    assert s.inner_var == pytest.approx(ref["inner_var"], rel=0.12)
    assert s.orthogonal_trace == pytest.approx(ref["orthogonal_trace"], rel=0.05)
    eta, theta, nu = 0.5, 0.5, 1.0
    expect_norm = ref["trace_cov"] / (eta**2 * ref["grad_sq_norm"])
    expect_ip = ref["inner_var"] / (theta**2 * ref["grad_sq_norm"] ** 2)
    expect_orth = ref["orthogonal_trace"] / (nu**2 * ref["grad_sq_norm"])
    assert stats.norm_test_batch_size(s, eta) == pytest.approx(expect_norm, rel=0.08)
    assert stats.inner_product_test_batch_size(s, theta) == pytest.approx(expect_ip, rel=0.15)
    assert stats.orthogonality_test_batch_size(s, nu) == pytest.approx(expect_orth, rel=0.08)
    est = stats.noise_estimate(s)
    assert est.noise_scale == pytest.approx(ref["trace_cov"] / ref["grad_sq_norm"], rel=0.06)


def test_demanded_batch_grows_as_w_approaches_the_optimum():
    """Near the optimum ‖G‖² → 0 while tr Σ → 4σ²d: every test demands more examples."""
    d, sigma, n = 5, 0.5, 20_000
    demands = []
    for scale in (2.0, 0.3, 0.1):
        delta = scale * torch.ones(d, dtype=torch.float64)
        s = stats.sample_grad_stats([_least_squares_grads(n, d, delta, sigma, seed=1)])
        demands.append(
            (stats.norm_test_batch_size(s, 0.5), stats.augmented_test_batch_size(s, 0.5, 1.0))
        )
    assert demands[0][0] < demands[1][0] < demands[2][0]
    assert demands[0][1] < demands[1][1] < demands[2][1]


def test_noise_estimate_equals_two_batch_estimator():
    """With micro-batch samples, noise_estimate == estimate_noise(mean small squared norm, big squared norm)."""
    g = torch.Generator().manual_seed(3)
    micro = torch.randn(6, 7, generator=g, dtype=torch.float64) + 1.0
    b = 4
    s = stats.sample_grad_stats([micro], scale=b)
    mean = micro.mean(0)
    ref = stats.estimate_noise(micro.pow(2).sum(1).mean(), mean.pow(2).sum(), b, b * 6)
    ours = stats.noise_estimate(s)
    assert ours.trace_cov == pytest.approx(ref.trace_cov, rel=1e-6)
    assert ours.grad_sq_norm == pytest.approx(ref.grad_sq_norm, rel=1e-6)


@pytest.mark.parametrize(
    ("current", "demanded", "kwargs", "expected"),
    [
        (32, 100.0, {}, 100),  # grow to the demand
        (32, 10.0, {}, 32),  # never shrink
        (32, 10.0, {"allow_shrink": True}, 10),
        (32, 10.0, {"allow_shrink": True, "max_growth_factor": 2.0}, 16),  # shrink by at most the same factor
        (32, 100.0, {"max_growth_factor": 2.0}, 64),  # growth cap
        (32, 100.0, {"max_batch_size": 48}, 48),
        (32, math.inf, {"max_batch_size": 256}, 256),
        (32, math.inf, {}, 32),  # unbounded infinite demand keeps the batch
        (32, math.nan, {}, 32),  # a skipped measurement keeps the batch
        (8, 1.0, {"min_batch_size": 16}, 16),
        (32, 40.5, {}, 41),
    ],
)
def test_next_batch_size(current, demanded, kwargs, expected):
    assert stats.next_batch_size(current, demanded, **kwargs) == expected


def test_next_batch_size_errors():
    with pytest.raises(ValueError, match="`current`"):
        stats.next_batch_size(0, 1.0)
    with pytest.raises(ValueError, match="`min_batch_size`"):
        stats.next_batch_size(4, 1.0, min_batch_size=0)
    with pytest.raises(ValueError, match="`max_batch_size`"):
        stats.next_batch_size(4, 1.0, min_batch_size=8, max_batch_size=4)
    with pytest.raises(ValueError, match="`max_growth_factor`"):
        stats.next_batch_size(4, 1.0, max_growth_factor=1.0)


def _correlated_blocks(n: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two parameter tensors whose per-example noise shares one scalar factor z_i (correlated across tensors)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 1, generator=g, dtype=torch.float64)
    a = torch.tensor([1.0, 0.5, -0.5], dtype=torch.float64) + z * torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64)
    b = torch.tensor([0.5, 1.0, 0.0], dtype=torch.float64) + z * torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64)
    a = a + 0.3 * torch.randn(n, 3, generator=g, dtype=torch.float64)
    b = b + 0.3 * torch.randn(n, 3, generator=g, dtype=torch.float64)
    return {"a": a, "b": b.reshape(n, 3, 1)}


def test_blockwise_statistics_equal_the_authors_per_tensor_tests():
    from tests.reference.adadagrad_authors import per_tensor_demands

    grads = _correlated_blocks()
    s = stats.blockwise_sample_grad_stats(list(grads.values()))
    ip_demand, orth_demand = per_tensor_demands(grads, theta=0.5, nu=1.0)
    # Same sums in another order, float64: 1e-9 relative.
    assert s.inner_var / (0.5**2 * s.grad_sq_norm**2) == pytest.approx(ip_demand, rel=1e-9)
    assert s.orthogonal_trace / (1.0 * s.grad_sq_norm) == pytest.approx(orth_demand, rel=1e-9)
    assert stats.inner_product_test_batch_size(s, 0.5) == math.ceil(ip_demand)
    assert stats.orthogonality_test_batch_size(s, 1.0) == math.ceil(orth_demand)
    full = stats.sample_grad_stats(list(grads.values()))
    # The norm test agrees under both (sample_grad_stats rounds its inputs to float32 first: 1e-6 relative).
    assert s.trace_cov == pytest.approx(full.trace_cov, rel=1e-6)


def test_full_vector_and_per_tensor_inner_product_tests_differ_on_correlated_blocks():
    grads = _correlated_blocks()
    flat = torch.cat([g.reshape(64, -1) for g in grads.values()], dim=1)
    mean = flat.mean(0)
    # The paper's statistic computed directly on the concatenated vector (torch.var, Bessel-corrected).
    direct_ip = torch.var(flat @ mean, correction=1).item()
    full = stats.sample_grad_stats(list(grads.values()))
    block = stats.blockwise_sample_grad_stats(list(grads.values()))
    assert full.inner_var == pytest.approx(direct_ip, rel=1e-6)  # float32 inputs in sample_grad_stats
    b_full, b_block = stats.inner_product_test_batch_size(full, 0.5), stats.inner_product_test_batch_size(block, 0.5)
    # The shared factor z adds the cross-tensor covariance 2·Cov(⟨aᵢ, ā⟩, ⟨bᵢ, b̄⟩) to the full-vector variance only:
    # demands 30.5 and 15.4 (about 2x: two equally loud, perfectly correlated blocks), far from any rounding edge.
    assert (b_full, b_block) == (31, 16)
    ortho = flat - torch.outer(flat @ mean, mean) / mean.pow(2).sum()
    assert full.orthogonal_trace == pytest.approx(torch.var(ortho, dim=0, correction=1).sum().item(), rel=1e-6)
    assert block.orthogonal_trace < 0.95 * full.orthogonal_trace  # 2.07 vs 2.23: projected per tensor


def test_blockwise_statistics_reduce_across_ranks_like_one_process():
    grads = list(_correlated_blocks().values())
    one = stats.blockwise_sample_grad_stats(grads)
    halves = [[g[:40] for g in grads], [g[40:] for g in grads]]  # unequal shares

    # Two 'ranks' as threads meeting at a barrier: each collective sums the two ranks' buffers (a fake all-reduce).
    parts: list[list[torch.Tensor]] = [[], []]
    barrier = threading.Barrier(2)
    results: list = [None, None]

    def run(r: int) -> None:
        def all_reduce(t: torch.Tensor) -> None:
            parts[r].append(t)
            barrier.wait()
            total = parts[0][-1] + parts[1][-1]
            barrier.wait()
            t.copy_(total)
        results[r] = stats.blockwise_sample_grad_stats(halves[r], all_reduce=all_reduce)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for res in results:  # float64 sums in another grouping: 1e-9 relative
        assert res.inner_var == pytest.approx(one.inner_var, rel=1e-9)
        assert res.orthogonal_trace == pytest.approx(one.orthogonal_trace, rel=1e-9)
        assert res.count == one.count == 64
