"""1-bit Adam core: torch's Adam/AdamW before the switch, DeepSpeed's update formula and compressed all-reduce
(transcribed per parameter from ``deepspeed/runtime/fp16/onebit/adam.py`` and ``runtime/comm/nccl.py``) after it at 2
and 3 ranks, link bytes, exact state round trip after freezing, non-finite steps and argument errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_convergence.comm import TorchDistCommunicator
from lightning_convergence.optim import OnebitAdam
from tests.helpers.dist import run_processes

SHAPES = [(5, 7), (3,), (40,)]  # 35 and 3 entries need padding at every W; 40 at W = 3


def _grad(rank, step, shape):
    gen = torch.Generator().manual_seed(1000 * step + 10 * rank + sum(shape))
    return torch.randn(shape, generator=gen, dtype=torch.float64)


def _init(shape):
    return torch.linspace(-1, 1, math.prod(shape), dtype=torch.float64).reshape(shape)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_before_the_switch_it_is_torch_adam_and_adamw(weight_decay):
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.003}]  # noqa: E731
    opt = OnebitAdam(groups(ours), lr=0.01, weight_decay=weight_decay, start_step=1000)
    torch_opt = (torch.optim.AdamW(groups(ref), lr=0.01, weight_decay=weight_decay) if weight_decay
                 else torch.optim.Adam(groups(ref), lr=0.01))
    for step in range(30):
        for p, q, s in zip(ours, ref, SHAPES):
            p.grad = _grad(0, step, s).float()
            q.grad = p.grad.clone()
        opt.step()
        torch_opt.step()
    for p, q in zip(ours, ref):
        assert torch.allclose(p, q, atol=1e-6, rtol=0)  # float32; foreach vs torch's order of the same operations
        assert torch.allclose(opt.state[p]["exp_avg_sq"], torch_opt.state[q]["exp_avg_sq"], atol=1e-7, rtol=0)


# ---- DeepSpeed, transcribed per parameter (their loop, their padding, their scales) ----
def _s(x):
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)  # sign().add_(1).bool() → 0 counts as +1


def ds_compressed_allreduce(buffers, worker_errors, server_errors, world_size):
    """NcclBackend.compressed_allreduce for one parameter, run for every rank; returns the common result."""
    n = buffers[0].numel()
    divider = world_size * 8 // math.gcd(world_size, 8)
    corrected = n if n % (world_size * divider) == 0 else n + world_size * divider - n % (world_size * divider)
    chunk = corrected // world_size
    signs, scales = [], []
    for r in range(world_size):
        if worker_errors[r] is None:
            worker_errors[r] = torch.zeros(corrected, dtype=buffers[r].dtype)
            server_errors[r] = torch.zeros(chunk, dtype=buffers[r].dtype)
        buf = torch.cat([buffers[r].reshape(-1), torch.zeros(corrected - n, dtype=buffers[r].dtype)])
        buf = buf + worker_errors[r]
        scale = torch.linalg.norm(buf) / math.sqrt(buf.numel())
        worker_errors[r] = buf - scale * _s(buf)
        signs.append(_s(buf))
        scales.append(scale)
    out_chunks = []
    for i in range(world_size):  # rank i is the server of chunk i
        server_m = sum(signs[r][i * chunk:(i + 1) * chunk] * scales[r] / world_size for r in range(world_size))
        server_m = server_m + server_errors[i]
        server_scale = torch.linalg.norm(server_m) / math.sqrt(server_m.numel())
        server_errors[i] = server_m - server_scale * _s(server_m)
        out_chunks.append(server_scale * _s(server_m))
    return torch.cat(out_chunks)[:n].reshape(buffers[0].shape)


def reference_onebit(world_size, steps, start_step, lr, wd, betas=(0.9, 0.999), eps=1e-8):
    """DeepSpeed's OnebitAdam.step (bias correction unused in their update) for all ranks; DDP averages gradients
    during warm-up (``enable_backward_allreduce``), local gradients afterwards."""
    params = [_init(s) for s in SHAPES]
    m = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
    v = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
    we = [[None] * world_size for _ in SHAPES]
    se = [[None] * world_size for _ in SHAPES]
    for step in range(steps):
        frozen = step >= start_step
        for i, shape in enumerate(SHAPES):
            grads = [_grad(r, step, shape) for r in range(world_size)]
            if not frozen:
                g = sum(grads) / world_size
                m[i] = betas[0] * m[i] + (1 - betas[0]) * g
                v[i] = betas[1] * v[i] + (1 - betas[1]) * g * g
            else:
                local = [betas[0] * m[i] + (1 - betas[0]) * g for g in grads]
                m[i] = ds_compressed_allreduce(local, we[i], se[i], world_size)
            update = m[i] / (v[i].sqrt() + eps) + wd * params[i]
            params[i] = params[i] - lr * update
    return params


def _run_ours(rank, world_size, steps, start_step, lr, wd, split=None):
    ps = [torch.nn.Parameter(_init(s)) for s in SHAPES]

    def make():
        o = OnebitAdam(ps, lr=lr, weight_decay=wd, start_step=start_step, bias_correction=False)
        o.attach(TorchDistCommunicator())
        return o

    opt = make()
    for step in range(steps):
        if step == split:  # exact resume: a fresh optimizer from the state_dict
            saved = opt.state_dict()
            opt = make()
            opt.load_state_dict(saved)
        frozen = step >= start_step
        for p, s in zip(ps, SHAPES):
            grads = [_grad(r, step, s) for r in range(world_size)]
            p.grad = grads[rank] if frozen else sum(grads) / world_size  # what DDP hands over before the switch
        opt.step()
    # numpy, not tensors: torch shares tensors put on a queue through the sender's file descriptors, which vanish
    # when the rank exits
    extra = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in opt.state_dict()["onebit"].items()}
    return [p.detach().numpy().copy() for p in ps], opt.comm.link_bytes_total, extra


@pytest.mark.parametrize("world_size", [2, 3])
def test_after_the_switch_it_follows_deepspeeds_update_and_compressed_allreduce(world_size):
    steps, start_step, lr, wd = 10, 4, 0.01, 0.1
    expected = reference_onebit(world_size, steps, start_step, lr, wd)
    results = run_processes(_run_ours, world_size, steps, start_step, lr, wd)
    for params, link_bytes, _ in results:
        for got, want in zip(params, expected):
            # float64 on both sides; a wrong scale, sign convention or error update moves entries by ~lr
            assert torch.allclose(torch.as_tensor(got), want, atol=1e-10, rtol=0)
        # per compressed step: all-to-all of W rows (C/8 sign bytes + (P + 1) float64 scales/flag) sends (W−1)/W of
        # it; all-gather of (C/8 + 8P) bytes sends (W−1)×. C = Σ chunks of the padded parameters.
        unit = world_size * (world_size * 8 // math.gcd(world_size, 8))
        c = sum(-(-math.prod(s) // unit) * unit for s in SHAPES) // world_size
        p = len(SHAPES)
        per_step = (world_size - 1) * (c // 8 + 8 * (p + 1)) + (world_size - 1) * (c // 8 + 8 * p)
        assert link_bytes == pytest.approx((steps - start_step) * per_step)


def test_state_round_trip_after_freezing_is_exact():
    straight = run_processes(_run_ours, 2, 9, 3, 0.01, 0.1)
    resumed = run_processes(_run_ours, 2, 9, 3, 0.01, 0.1, 6)
    for a, b in zip(straight, resumed):
        assert all(np.array_equal(x, y) for x, y in zip(a[0], b[0]))
        assert np.array_equal(a[2]["worker_error"], b[2]["worker_error"])
        assert np.array_equal(a[2]["server_error"], b[2]["server_error"])
    assert not np.array_equal(straight[0][2]["worker_error"], straight[1][2]["worker_error"])  # really per rank


def test_single_process_after_the_switch_is_adam_with_the_variance_frozen():
    # W = 1: nothing to compress, so after start_step the step is Adam whose v (and its bias correction 1 − β2^T)
    # stopped at step T = start_step, while m and its correction 1 − β1^t go on
    b1, b2, lr, eps, start = 0.5, 0.9, 0.1, 1e-8, 2
    p = torch.nn.Parameter(_init((6,)))
    opt = OnebitAdam([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=0.0, start_step=start)
    x, m, v = _init((6,)), torch.zeros(6, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)
    for t in range(1, 6):
        g = _grad(0, t, (6,))
        p.grad = g.clone()
        opt.step()
        m = b1 * m + (1 - b1) * g
        if t <= start:
            v = b2 * v + (1 - b2) * g * g
        x = x - lr / (1 - b1**t) * m / ((v / (1 - b2 ** min(t, start))).sqrt() + eps)
    assert torch.allclose(p.detach(), x, atol=1e-12, rtol=0)  # float64, same operations up to order


def test_nonfinite_gradient_changes_nothing_and_is_counted():
    p = torch.nn.Parameter(torch.ones(4))
    opt = OnebitAdam([p], lr=0.1, start_step=1)
    p.grad = torch.ones(4)
    opt.step()
    before = (p.detach().clone(), opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone())
    p.grad = torch.tensor([1.0, float("inf"), 0.0, 0.0])
    opt.step()
    assert torch.equal(p.detach(), before[0]) and torch.equal(opt.state[p]["exp_avg"], before[1])
    assert torch.equal(opt.state[p]["exp_avg_sq"], before[2])
    assert float(opt.nonfinite_skipped_total) == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(lr=-1.0), "`lr`"), (dict(betas=(0.9, 1.0)), "`betas`"), (dict(eps=0.0), "`eps`"),
     (dict(weight_decay=-0.1), "`weight_decay`"), (dict(start_step=0), "`start_step`")],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OnebitAdam([torch.nn.Parameter(torch.zeros(2))], **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA path: needs a GPU")
def test_cuda_step_matches_cpu():
    cpu = [torch.nn.Parameter(_init(s)) for s in SHAPES]
    gpu = [torch.nn.Parameter(p.detach().cuda()) for p in cpu]
    opts = [OnebitAdam(ps, lr=0.01, start_step=2) for ps in (cpu, gpu)]
    for step in range(5):
        for p, q, s in zip(cpu, gpu, SHAPES):
            p.grad = _grad(0, step, s)
            q.grad = p.grad.cuda()
        for o in opts:
            o.step()
    for p, q in zip(cpu, gpu):
        assert torch.allclose(q.detach().cpu(), p.detach(), atol=1e-12)  # float64 on both devices
