"""Per-example gradient variance: exact per-sample gradients, the micro-batch/cross-rank estimator, and the
distributed reduction that combines per-rank statistics by the law of total variance.

All batch-size tests of AdAdaGrad (Lau, Liu, Kolar. *AdAdaGrad: Adaptive Batch Size Schemes for Adaptive
Gradient Methods.* arXiv:2402.11215, 2024) need only three numbers, computed here once:

* ``trace_cov`` = ``Σ_coords Var_i[∇f_i]`` (``‖Var‖₁``, i.e. ``tr Σ``),
* ``grad_sq_norm`` = ``‖ḡ‖²`` of the mean gradient,
* ``inner_var`` = ``Var_i[⟨∇f_i, ḡ⟩]``.

The orthogonality statistic follows in closed form: with ``a_i = ⟨∇f_i, ḡ⟩/‖ḡ‖²``,
``Σ_coords Var[∇f_i − a_i ḡ] = tr Σ − inner_var/‖ḡ‖²``.

*Samples* are either exact per-example gradients (``scale=1``) or means over ``b`` examples each (micro-batches or
ranks): their covariance is ``Σ/b``, so ``scale=b`` turns their sample variance back into a per-example one.
Variances are unbiased (Bessel's correction), as in AdAdaGrad's tests.

Distributed: every rank passes its local samples and a summing ``all_reduce`` callable; the counts, vector sums and
sums of squares are reduced, which is exactly the law of total variance
``Var = mean_r Var_r (within) + Var_r mean_r (between)`` with unequal counts handled.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["AllReduce", "SampleGradStats", "per_sample_grads", "sample_grad_stats"]

#: An in-place SUM all-reduce over a flat tensor, e.g. ``lambda t: dist.all_reduce(t)`` (returns nothing).
AllReduce = Callable[[Tensor], object]


@dataclass(frozen=True)
class SampleGradStats:
    """Gradient statistics of a batch, per example (see module docstring)."""

    count: int
    trace_cov: float
    grad_sq_norm: float
    inner_var: float

    @property
    def orthogonal_trace(self) -> float:
        """``Σ_coords Var[∇f_i − (⟨∇f_i,ḡ⟩/‖ḡ‖²)ḡ]``, the orthogonality test's numerator."""
        if self.grad_sq_norm <= 0:
            return self.trace_cov
        return max(self.trace_cov - self.inner_var / self.grad_sq_norm, 0.0)


def _flat(samples: Sequence[Tensor]) -> Tensor:
    """Concatenate ``[n, ...]`` tensors into one ``[n, d]`` float32 matrix."""
    n = samples[0].shape[0]
    return torch.cat([s.reshape(n, -1).float() for s in samples], dim=1)


def sample_grad_stats(
    samples: Sequence[Tensor], scale: float = 1.0, all_reduce: AllReduce | None = None
) -> SampleGradStats:
    """Per-example variance statistics from gradient samples, optionally reduced across ranks.

    Args:
        samples: one ``[n, *param_shape]`` tensor per parameter; row ``i`` of each is sample ``i``'s gradient.
        scale: examples per sample: 1 for exact per-sample gradients, ``b`` for gradients averaged over ``b``.
        all_reduce: in-place SUM all-reduce across ranks, or ``None`` for a single process. Every rank must call
            with the same parameter shapes.

    Raises:
        ValueError: if no samples are given, or fewer than 2 in total (no variance), or ``scale`` ≤ 0.
    """
    if not samples:
        raise ValueError("sample_grad_stats: `samples` is empty.")
    if scale <= 0:
        raise ValueError(f"sample_grad_stats: `scale` must be > 0, got {scale}.")
    # float64 for the sums: trace = Σ|x|² − n|x̄|² cancels heavily when the noise is small.
    x = _flat(samples).double()
    n_local = x.shape[0]
    # One buffer for the first reduction: [count, sum of squared norms, vector sum].
    head = torch.stack([torch.tensor(float(n_local), device=x.device, dtype=x.dtype), x.pow(2).sum()])
    buf = torch.cat([head, x.sum(dim=0)])
    if all_reduce is not None:
        all_reduce(buf)
    n, sumsq, vec_sum = buf[0].item(), buf[1], buf[2:]
    if n < 2:
        raise ValueError(f"sample_grad_stats: need at least 2 samples in total for a variance, got {int(n)}.")
    mean = vec_sum / n
    g2 = mean.pow(2).sum()
    trace = (sumsq - n * g2) / (n - 1)
    ips = x @ mean
    ip_buf = torch.stack([ips.sum(), ips.pow(2).sum()])
    if all_reduce is not None:
        all_reduce(ip_buf)
    inner_var = (ip_buf[1] - ip_buf[0] ** 2 / n) / (n - 1)
    return SampleGradStats(
        count=int(n) if scale == 1 else int(round(n * scale)),
        trace_cov=float(trace.clamp_min(0.0)) * scale,
        grad_sq_norm=float(g2),
        inner_var=float(inner_var.clamp_min(0.0)) * scale,
    )


def per_sample_grads(
    module: torch.nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    params: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Exact per-example gradients with ``torch.func`` (``vmap`` over ``grad`` of a functional call).

    Memory is ``batch × parameters``: use it on small models or parameter subsets (pass ``params``), and prefer
    :func:`sample_grad_stats` over micro-batch gradients for large models.

    Args:
        module: the model; evaluated with ``torch.func.functional_call``, so its own parameters are untouched.
        loss_fn: ``loss_fn(output, target)`` for a batch of one example, returning a scalar (mean reduction).
        inputs: the batch's inputs, leading dimension = batch.
        targets: the batch's targets, leading dimension = batch.
        params: the parameters to differentiate, by name (default: every parameter that requires grad).

    Returns:
        ``{name: tensor of shape [batch, *param.shape]}``.
    """
    from torch.func import functional_call, grad, vmap

    if params is None:
        params = {k: v.detach() for k, v in module.named_parameters() if v.requires_grad}
    else:
        params = {k: v.detach() for k, v in params.items()}
    frozen = {k: v.detach() for k, v in module.named_parameters() if k not in params}
    buffers = {k: v.detach() for k, v in module.named_buffers()}

    def loss_one(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(module, {**frozen, **p, **buffers}, (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0))

    return vmap(grad(loss_one), in_dims=(None, 0, 0))(params, inputs, targets)
