"""Adaptive batch-size tests of AdAdaGrad, the noise-scale rule, and the bounded batch-size update.

Paper: Lau, Liu, Kolar. *AdAdaGrad: Adaptive Batch Size Schemes for Adaptive Gradient Methods.* arXiv:2402.11215,
2024 (the norm, inner-product, orthogonality and augmented inner-product tests). Gradient noise scale: McCandlish,
Kaplan, Amodei. *An Empirical Model of Large-Batch Training.* arXiv:1812.06162, 2018.

Two definitions of the inner-product and orthogonality statistics, both offered:

* **full vector** (the paper's definition; :func:`~lightning_convergence.stats.sample_grad_stats`): ``∇f_i`` and
  ``ḡ`` are the whole flattened gradient, so ``Var̂[⟨∇f_i, ḡ⟩]`` includes the covariance between tensors.
* **per tensor** (the authors' code, ``timlautk/AdAdaGrad`` ``tests.py``; :func:`blockwise_sample_grad_stats`):
  ``Σ_t Var̂[⟨∇f_iᵗ, ḡᵗ⟩]`` and ``Σ_t tr Σ̂ᵗ_⊥`` with each tensor ``t`` projected on its own mean ``ḡᵗ``; the
  cross-tensor covariances are dropped, and the denominators keep the whole ``‖ḡ‖²``. On gradients whose tensors
  are correlated the two demand different batch sizes (tested: 91 vs 47 for the inner-product test).

The norm test is the same under both (a trace is a sum over tensors).

Every test maps the per-example gradient statistics of one batch (:class:`~lightning_convergence.stats.SampleGradStats`,
computed once by :func:`~lightning_convergence.stats.sample_grad_stats`) to the batch size it demands::

    norm test:           b = ceil( tr Σ̂ / (η² ‖ḡ‖²) )
    inner-product test:  b = ceil( Var̂[⟨∇f_i, ḡ⟩] / (θ² ‖ḡ‖⁴) )
    orthogonality test:  b = ceil( tr Σ̂_⊥ / (ν² ‖ḡ‖²) )        (Σ̂_⊥: covariance of ∇f_i minus its ḡ component)
    augmented test:      b = max(inner-product, orthogonality)
    noise-scale rule:    b = ceil( B_simple ),  B_simple = tr Σ / |G|²,  |G|² ≈ ‖ḡ‖² − tr Σ̂ / B

A zero (or non-positive) mean gradient demands an infinite batch (``math.inf``); callers clip with
:func:`next_batch_size`. Non-finite statistics give ``math.nan``: callers must skip that measurement.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_convergence._checks import argument_error
from lightning_convergence.stats.noise_scale import NoiseEstimate
from lightning_convergence.stats.variance import AllReduce, SampleGradStats

__all__ = [
    "BATCH_TESTS",
    "BlockwiseGradStats",
    "augmented_test_batch_size",
    "blockwise_sample_grad_stats",
    "demanded_batch_size",
    "inner_product_test_batch_size",
    "next_batch_size",
    "noise_estimate",
    "norm_test_batch_size",
    "orthogonality_test_batch_size",
]


@dataclass(frozen=True)
class BlockwiseGradStats:
    """Per-example statistics with inner products taken per tensor (the authors' code; see the module docstring).

    Accepted by every test function in place of :class:`~lightning_convergence.stats.SampleGradStats`.
    ``trace_cov`` and ``grad_sq_norm`` equal the full-vector ones; ``inner_var`` is ``Σ_t Var̂[⟨∇f_iᵗ, ḡᵗ⟩]`` and
    ``orthogonal_trace`` is ``Σ_t (tr Σ̂ᵗ − Var̂[⟨∇f_iᵗ, ḡᵗ⟩]/‖ḡᵗ‖²)`` (a tensor with ``ḡᵗ = 0`` adds its trace).
    """

    count: int
    trace_cov: float
    grad_sq_norm: float
    inner_var: float
    orthogonal_trace: float


def blockwise_sample_grad_stats(
    samples: Sequence[Tensor], scale: float = 1.0, all_reduce: AllReduce | None = None
) -> BlockwiseGradStats:
    """:func:`~lightning_convergence.stats.sample_grad_stats` with the authors' per-tensor inner products.

    Args:
        samples: one ``[n, *param_shape]`` tensor per parameter; row ``i`` of each is sample ``i``'s gradient.
        scale: examples per sample: 1 for exact per-sample gradients, ``b`` for gradients averaged over ``b``.
        all_reduce: in-place SUM all-reduce across ranks, or ``None``. Per-rank sums are reduced (the law of total
            variance, as the authors' ``*_distributed`` tests), with every tensor projected on the global ``ḡᵗ``.

    Raises:
        ValueError: if no samples are given, fewer than 2 in total, or ``scale`` ≤ 0.
    """
    if not samples:
        raise ValueError("blockwise_sample_grad_stats: `samples` is empty.")
    if scale <= 0:
        raise ValueError(f"blockwise_sample_grad_stats: `scale` must be > 0, got {scale}.")
    n_local = samples[0].shape[0]
    xs = [s.reshape(n_local, -1).double() for s in samples]
    sizes = [x.shape[1] for x in xs]
    k = len(xs)
    # [count, Σ‖x_iᵗ‖² per tensor, vector sums]: one reduction (float64: the sums cancel when the noise is small).
    head = torch.cat([torch.tensor([float(n_local)], dtype=torch.float64, device=xs[0].device),
                      torch.stack([x.pow(2).sum() for x in xs])])
    buf = torch.cat([head] + [x.sum(dim=0) for x in xs])
    if all_reduce is not None:
        all_reduce(buf)
    n, sumsq = buf[0].item(), buf[1 : 1 + k]
    if n < 2:
        raise ValueError(f"blockwise_sample_grad_stats: need at least 2 samples in total, got {int(n)}.")
    means = [m / n for m in buf[1 + k :].split(sizes)]
    g2 = torch.stack([m.pow(2).sum() for m in means])
    trace = (sumsq - n * g2) / (n - 1)
    ips = torch.stack([x @ m for x, m in zip(xs, means)])  # [tensors, samples]
    ip_buf = torch.cat([ips.sum(dim=1), ips.pow(2).sum(dim=1)])
    if all_reduce is not None:
        all_reduce(ip_buf)
    inner = ((ip_buf[k:] - ip_buf[:k] ** 2 / n) / (n - 1)).clamp_min(0.0)
    orth = torch.where(g2 > 0, trace - inner / g2.clamp_min(1e-300), trace).clamp_min(0.0)
    return BlockwiseGradStats(
        count=int(n) if scale == 1 else int(round(n * scale)),
        trace_cov=float(trace.clamp_min(0.0).sum()) * scale,
        grad_sq_norm=float(g2.sum()),
        inner_var=float(inner.sum()) * scale,
        orthogonal_trace=float(orth.sum()) * scale,
    )


def _finite(stats: SampleGradStats | BlockwiseGradStats) -> bool:
    return all(math.isfinite(v) for v in (stats.trace_cov, stats.grad_sq_norm, stats.inner_var))


def _check_positive(name: str, value: float) -> float:
    value = float(value)
    if not value > 0 or not math.isfinite(value):
        raise argument_error("batch_tests", name, "a finite number > 0", value)
    return value


def _ceil_ratio(num: float, den: float) -> float:
    if den <= 0:
        return math.inf if num > 0 else 1.0
    return float(max(math.ceil(num / den), 1))


def norm_test_batch_size(stats: SampleGradStats | BlockwiseGradStats, eta: float) -> float:
    """AdAdaGrad's norm test: ``ceil(tr Σ̂ / (η² ‖ḡ‖²))``.

    Args:
        stats: per-example gradient statistics of the current batch (full vector or per tensor).
        eta: η > 0, the allowed relative error ``E‖g_B − ∇F‖² ≤ η²‖∇F‖²``. Paper default 0.1; larger η
            demands smaller batches (η 0.5 is a milder schedule).

    Returns:
        The demanded batch size as a float (an integer ≥ 1, ``inf`` if ``‖ḡ‖² = 0``, ``nan`` if non-finite).
    """
    eta = _check_positive("eta", eta)
    if not _finite(stats):
        return math.nan
    return _ceil_ratio(stats.trace_cov, eta**2 * stats.grad_sq_norm)


def inner_product_test_batch_size(stats: SampleGradStats | BlockwiseGradStats, theta: float) -> float:
    """AdAdaGrad's inner-product test: ``ceil(Var̂[⟨∇f_i, ḡ⟩] / (θ² ‖ḡ‖⁴))``.

    Args:
        stats: per-example gradient statistics of the current batch (full vector or per tensor).
        theta: θ > 0, the allowed relative variance of the gradient's component along ``ḡ``. Paper default 0.1,
            README examples 0.5. It controls only the descent-direction noise, so it demands smaller batches than
            the norm test at the same value.
    """
    theta = _check_positive("theta", theta)
    if not _finite(stats):
        return math.nan
    return _ceil_ratio(stats.inner_var, theta**2 * stats.grad_sq_norm**2)


def orthogonality_test_batch_size(stats: SampleGradStats | BlockwiseGradStats, nu: float) -> float:
    """AdAdaGrad's orthogonality test: ``ceil(tr Σ̂_⊥ / (ν² ‖ḡ‖²))`` with ``tr Σ̂_⊥ = tr Σ̂ − Var̂[⟨∇f_i,ḡ⟩]/‖ḡ‖²``.

    Args:
        stats: per-example gradient statistics of the current batch (full vector or per tensor).
        nu: ν > 0, the allowed relative size of the noise orthogonal to ``ḡ``. Paper default 0.1, README examples
            1.0 (the orthogonal part is usually most of the noise, so ν is set larger than θ).
    """
    nu = _check_positive("nu", nu)
    if not _finite(stats):
        return math.nan
    return _ceil_ratio(stats.orthogonal_trace, nu**2 * stats.grad_sq_norm)


def augmented_test_batch_size(stats: SampleGradStats | BlockwiseGradStats, theta: float, nu: float) -> float:
    """AdAdaGrad's augmented inner-product test: ``max(inner-product test, orthogonality test)``."""
    return max(inner_product_test_batch_size(stats, theta), orthogonality_test_batch_size(stats, nu))


def noise_estimate(stats: SampleGradStats | BlockwiseGradStats) -> NoiseEstimate:
    """Unbiased ``(|G|², tr Σ)`` from batch statistics, for :class:`~lightning_convergence.stats.GradientNoiseScale`.

    ``E‖ḡ‖² = |G|² + tr Σ / B`` for a mean over ``B = stats.count`` examples, so ``|G|² ≈ ‖ḡ‖² − tr Σ̂ / B``
    (McCandlish et al., App. A). With micro-batch statistics this equals
    :func:`~lightning_convergence.stats.estimate_noise` fed the mean micro-batch squared norm.
    """
    return NoiseEstimate(
        grad_sq_norm=stats.grad_sq_norm - stats.trace_cov / max(stats.count, 1), trace_cov=stats.trace_cov
    )


def next_batch_size(
    current: int,
    demanded: float,
    min_batch_size: int = 1,
    max_batch_size: int | None = None,
    max_growth_factor: float | None = None,
    allow_shrink: bool = False,
) -> int:
    """The next global batch size: ``demanded``, bounded by the growth cap and ``[min_batch_size, max_batch_size]``.

    AdAdaGrad's update is ``b_{k+1} = min(max(b_k, b_new), b_max)``: the batch never shrinks. With
    ``allow_shrink`` it may, by at most the same factor per test (``current / max_growth_factor``).

    Args:
        current: the current global batch size, ≥ 1.
        demanded: what the test demands; ``nan`` keeps ``current`` (within the bounds), and ``inf`` with neither
            a growth cap nor a maximum keeps it too.
        min_batch_size: lower bound, ≥ 1.
        max_batch_size: upper bound, or ``None`` for none.
        max_growth_factor: at most this factor per test (> 1), or ``None`` for no cap.
        allow_shrink: let the batch decrease when the test demands less.

    Raises:
        ValueError: for ``current`` < 1, ``min_batch_size`` < 1, ``max_batch_size`` < ``min_batch_size`` or a
            ``max_growth_factor`` ≤ 1.
    """
    for field, value in (("current", current), ("min_batch_size", min_batch_size)):
        if value < 1:
            raise argument_error("next_batch_size", field, ">= 1", value)
    if max_batch_size is not None and max_batch_size < min_batch_size:
        raise argument_error("next_batch_size", "max_batch_size", f">= `min_batch_size` ({min_batch_size})",
                             max_batch_size)
    if max_growth_factor is not None and not max_growth_factor > 1:
        raise argument_error("next_batch_size", "max_growth_factor", "> 1", max_growth_factor)
    target = float(current) if math.isnan(demanded) else float(demanded)
    if not allow_shrink:
        target = max(target, float(current))
    if max_growth_factor is not None:
        target = min(target, math.ceil(current * max_growth_factor))
        if allow_shrink:
            target = max(target, math.floor(current / max_growth_factor))
    upper = math.inf if max_batch_size is None else float(max_batch_size)
    target = min(max(target, float(min_batch_size)), upper)
    if math.isinf(target):  # an infinite demand with no bound at all: nothing sensible to grow to
        return max(current, min_batch_size)
    return int(math.ceil(target))


BATCH_TESTS = ("norm", "inner_product", "augmented", "noise_scale")


def demanded_batch_size(
    test: str, stats: SampleGradStats | BlockwiseGradStats, *, eta: float = 0.1, theta: float = 0.1, nu: float = 0.1,
    noise_scale: float = math.nan, noise_scale_factor: float = 1.0,
) -> float:
    """The global batch one test demands: AdAdaGrad's ``"norm"`` (η), ``"inner_product"`` (θ) or ``"augmented"``
    (θ, ν) test on ``stats``, or ``"noise_scale"``: ``ceil(noise_scale_factor × B_simple)`` (McCandlish et al.) from
    the given ``noise_scale``, at least 1. ``nan`` means "no estimate"; ``inf`` "larger than any batch".

    Raises:
        ValueError: for an unknown ``test``.
    """
    if test == "norm":
        return norm_test_batch_size(stats, eta)
    if test == "inner_product":
        return inner_product_test_batch_size(stats, theta)
    if test == "augmented":
        return augmented_test_batch_size(stats, theta, nu)
    if test != "noise_scale":
        raise argument_error("demanded_batch_size", "test", "one of " + ", ".join(map(repr, BATCH_TESTS)), test)
    if math.isnan(noise_scale) or math.isinf(noise_scale):
        return noise_scale
    return float(max(math.ceil(noise_scale_factor * noise_scale), 1))
