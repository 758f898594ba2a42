"""AdaGradNorm against a literal transcription of Ward et al.'s update, plus state and errors."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_convergence.optim import AdaGradNorm


def _reference_steps(params, grads_seq, lrs, b0_sq, wd=0.0):
    """b_{k+1}^2 = b_k^2 + ||g_k||^2 (all groups); x_{k+1} = x_k - lr_group * g_k / b_{k+1}. Float64, plain loops."""
    xs = [[p.detach().double().clone() for p in group] for group in params]
    b_sq = b0_sq
    for grads in grads_seq:
        gs = [[g.double() + wd * x for g, x in zip(gg, xg)] for gg, xg in zip(grads, xs)]
        b_sq += sum(float((g * g).sum()) for gg in gs for g in gg)
        b = math.sqrt(b_sq)
        xs = [[x - lr * g / b for x, g in zip(xg, gg)] for xg, gg, lr in zip(xs, gs, lrs)]
    return xs, b_sq


@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_adagrad_norm_matches_reference_for_60_steps(wd):
    gen = torch.Generator().manual_seed(0)
    groups = [[torch.randn(3, 4, generator=gen, dtype=torch.float64), torch.randn(5, generator=gen,
                                                                                   dtype=torch.float64)],
              [torch.randn(2, 2, generator=gen, dtype=torch.float64)]]
    lrs = [0.7, 0.2]
    params = [[torch.nn.Parameter(t.clone()) for t in g] for g in groups]
    opt = AdaGradNorm([{"params": params[0], "lr": lrs[0]}, {"params": params[1], "lr": lrs[1]}],
                      initial_accumulator_value=0.05, weight_decay=wd)
    grads_seq = [[[torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in g] for g in groups]
                 for _ in range(60)]
    for grads in grads_seq:
        for pg, gg in zip(params, grads):
            for p, g in zip(pg, gg):
                p.grad = g.clone()
        opt.step()
    ref, ref_b_sq = _reference_steps(groups, grads_seq, lrs, 0.05, wd)
    for pg, rg in zip(params, ref):
        for p, r in zip(pg, rg):
            # sq_norm accumulates in float32, so b differs from the float64 reference by ~1e-7 relative.
            torch.testing.assert_close(p.detach(), r, rtol=1e-5, atol=1e-6)
    assert opt.param_groups[0]["b_sq"] == pytest.approx(ref_b_sq, rel=1e-6)
    assert opt.param_groups[1]["b_sq"] == opt.param_groups[0]["b_sq"]


def test_adagrad_norm_first_step_by_hand():
    p = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    opt = AdaGradNorm([p], lr=1.0, initial_accumulator_value=7.0)
    p.grad = torch.tensor([3.0, 0.0])  # b^2 = 7 + 9 = 16, b = 4: x = [1 - 3/4, 1]
    opt.step()
    assert p.detach().tolist() == pytest.approx([0.25, 1.0])
    assert opt.b == pytest.approx(4.0)


def test_adagrad_norm_state_dict_roundtrip_and_nonfinite_skip():
    p = torch.nn.Parameter(torch.ones(3))
    opt = AdaGradNorm([p], lr=0.5)
    p.grad = torch.ones(3)
    opt.step()
    p.grad = torch.tensor([1.0, float("nan"), 0.0])
    before = p.detach().clone()
    opt.step()
    assert torch.equal(p.detach(), before)
    assert opt.param_groups[0]["nonfinite_skipped_total"] == 1
    q = torch.nn.Parameter(torch.ones(3))
    opt2 = AdaGradNorm([q], lr=0.5)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.param_groups[0]["b_sq"] == opt.param_groups[0]["b_sq"]


@pytest.mark.parametrize(("kw", "field"), [({"lr": 0.0}, "lr"), ({"initial_accumulator_value": 0.0},
                                                                   "initial_accumulator_value"),
                                           ({"weight_decay": -1.0}, "weight_decay")])
def test_adagrad_norm_errors(kw, field):
    with pytest.raises(ValueError, match=field):
        AdaGradNorm([torch.nn.Parameter(torch.ones(1))], **kw)
