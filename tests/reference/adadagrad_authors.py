"""AdAdaGrad's inner-product and orthogonality tests as the authors' code computes them (timlautk/AdAdaGrad
``tests.py``: ``inner_product_test``, ``orthogonality_test``), transcribed literally and slowly from reading it.

For each parameter tensor separately: the batch mean ``ḡᵗ``, per-example inner products ``⟨∇f_iᵗ, ḡᵗ⟩`` and the
component of ``∇f_iᵗ`` orthogonal to ``ḡᵗ``, their unbiased variances, summed over tensors; the denominators use the
squared norm of the whole mean gradient ``Σ_t ‖ḡᵗ‖²``. The batch size returned is the raw demand (the authors'
function then takes the max with the current batch size and the ceiling).
"""

from __future__ import annotations

import torch


def inner_product_demand(per_sample: dict[str, torch.Tensor], theta: float) -> float:
    norm_sq, variances = 0.0, 0.0
    for g in per_sample.values():
        b = g.shape[0]
        mean = g.mean(dim=0)
        ips = torch.inner(g.reshape(b, -1), mean.ravel())
        norm_sq += float(torch.linalg.vector_norm(mean.ravel()) ** 2)
        variances += float(torch.var(ips, dim=0, correction=1))
    return variances / (theta**2 * norm_sq**2)


def orthogonality_demand(per_sample: dict[str, torch.Tensor], nu: float) -> float:
    norm_sq, variances = 0.0, 0.0
    for g in per_sample.values():
        b = g.shape[0]
        mean = g.mean(dim=0)
        ips = torch.inner(g.reshape(b, -1), mean.ravel())
        ortho = g.reshape(b, -1) - torch.outer(ips, mean.ravel()) / torch.linalg.vector_norm(mean.ravel()) ** 2
        norm_sq += float(torch.linalg.vector_norm(mean.ravel()) ** 2)
        variances += float(torch.var(ortho, dim=0, correction=1).sum())
    return variances / (nu**2 * norm_sq)
