"""AdAdaGrad's inner-product and orthogonality tests as the authors' code computes them (timlautk/AdAdaGrad
``tests.py``: ``inner_product_test``, ``orthogonality_test``), transcribed slowly from reading it (one loop for both).

For each parameter tensor separately: the batch mean ``ḡᵗ``, per-example inner products ``⟨∇f_iᵗ, ḡᵗ⟩`` and the
component of ``∇f_iᵗ`` orthogonal to ``ḡᵗ``, their unbiased variances, summed over tensors; the denominators use the
squared norm of the whole mean gradient ``Σ_t ‖ḡᵗ‖²``. The batch size returned is the raw demand (the authors'
function then takes the max with the current batch size and the ceiling).
"""

from __future__ import annotations

import torch


def per_tensor_demands(per_sample: dict[str, torch.Tensor], theta: float, nu: float) -> tuple[float, float]:
    """The raw inner-product and orthogonality demands (the authors compute them in two loops of this shape)."""
    norm_sq, ip_var, orth_var = 0.0, 0.0, 0.0
    for g in per_sample.values():
        b = g.shape[0]
        mean = g.mean(dim=0)
        ips = torch.inner(g.reshape(b, -1), mean.ravel())
        ortho = g.reshape(b, -1) - torch.outer(ips, mean.ravel()) / torch.linalg.vector_norm(mean.ravel()) ** 2
        norm_sq += float(torch.linalg.vector_norm(mean.ravel()) ** 2)
        ip_var += float(torch.var(ips, dim=0, correction=1))
        orth_var += float(torch.var(ortho, dim=0, correction=1).sum())
    return ip_var / (theta**2 * norm_sq**2), orth_var / (nu**2 * norm_sq)
