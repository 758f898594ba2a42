"""FedBuff's server as the authors' group's FLSim runs it (``flsim/optimizers/async_aggregators.py``:
``HybridAggregator`` / ``FedAvgWithLRHybridAggregator``), transcribed from reading it.

Each client reports ``delta = model_before_training − model_after_training``; the reducer (default
``ReductionType.WEIGHTED_SUM``, not an average) accumulates ``weight · delta``; after ``buffer_size`` reports the sum is
set as the global model's gradient and one step of ``torch.optim.SGD(lr, momentum)`` is taken. No division by K.
"""

from __future__ import annotations

import torch


def fedbuff_flsim(w0: torch.Tensor, reports: list[torch.Tensor], buffer_size: int, lr: float,
                  momentum: float, weights: list[float] | None = None) -> torch.Tensor:
    """``reports`` are the clients' ``after − before`` model differences in arrival order; returns the model."""
    w = torch.nn.Parameter(w0.clone())
    opt = torch.optim.SGD([w], lr=lr, momentum=momentum)
    total, count = torch.zeros_like(w0), 0
    for k, after_minus_before in enumerate(reports):
        total += (1.0 if weights is None else weights[k]) * (-after_minus_before)  # delta = before − after
        count += 1
        if count >= buffer_size:
            w.grad = total.clone()
            opt.step()
            total, count = torch.zeros_like(w0), 0
    return w.detach()
