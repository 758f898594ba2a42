"""The adaptive-batch cores moved out of the callback, checked by hand and without Lightning."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_convergence.data.batch_plan import lr_scale_ratio, scale_lrs
from lightning_convergence.stats import SampleGradStats, demanded_batch_size


def test_lr_scale_ratio_by_hand():
    assert lr_scale_ratio(32, 64, "linear") == 2.0
    assert lr_scale_ratio(32, 128, "sqrt") == 2.0  # sqrt(4)
    assert lr_scale_ratio(32, 128, "none") == 1.0
    assert lr_scale_ratio(0, 128, "linear") == 1.0  # no batch yet: nothing to scale from
    with pytest.raises(ValueError, match="`rule` must be one of"):
        lr_scale_ratio(1, 2, "cubic")


def test_scale_lrs_scales_groups_initial_lr_and_scheduler_bases():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10)  # sets initial_lr and base_lrs to 0.1
    scale_lrs([opt], [sched], 2.0)
    group = opt.param_groups[0]
    assert (group["lr"], group["initial_lr"], sched.base_lrs) == (0.2, 0.2, [0.2])


def test_demanded_batch_size_by_hand():
    # tr Σ = 8, ‖ḡ‖² = 2, Var⟨∇f_i, ḡ⟩ = 2: norm test ⌈8 / (0.5² · 2)⌉ = 16; inner product ⌈2 / (0.5² · 2²)⌉ = 2.
    s = SampleGradStats(count=4, trace_cov=8.0, grad_sq_norm=2.0, inner_var=2.0)
    assert demanded_batch_size("norm", s, eta=0.5) == 16
    assert demanded_batch_size("inner_product", s, theta=0.5) == 2
    assert demanded_batch_size("noise_scale", s, noise_scale=3.2) == 4  # ⌈1.0 · 3.2⌉
    assert demanded_batch_size("noise_scale", s, noise_scale=3.2, noise_scale_factor=2.0) == 7  # ⌈6.4⌉
    assert math.isnan(demanded_batch_size("noise_scale", s))  # no estimate yet
    with pytest.raises(ValueError, match="`test` must be one of"):
        demanded_batch_size("hessian", s)
