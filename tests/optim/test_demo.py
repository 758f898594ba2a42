"""DeMo core: DCT against scipy, one step by hand at 2 ranks, the authors' algorithm transcribed (bloc97/DeMo) at 2 and
3 ranks, the full-transfer reduction to sign-SGD, non-finite steps, state round trip and argument errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.fft
import torch

from lightning_convergence.comm import TorchDistCommunicator
from lightning_convergence.optim import DeMo
from lightning_convergence.optim.demo import chunk_size_for, dct_matrix, from_chunks, to_chunks
from tests.helpers.dist import run_processes


def test_dct_matrix_is_scipys_orthonormal_dct_ii():
    eye = np.eye(6)
    expected = scipy.fft.dct(eye, type=2, norm="ortho", axis=0)  # column j = DCT of e_j, i.e. the matrix D
    assert np.allclose(dct_matrix(6, torch.float64).numpy(), expected, atol=1e-12)  # float64 round-off


@pytest.mark.parametrize("n, target, expected", [(128, 64, 64), (65, 64, 13), (10, 8, 5), (7, 64, 7), (1, 64, 1),
                                                 (97, 64, 1)])
def test_chunk_size_is_the_largest_divisor_not_above_the_target(n, target, expected):
    assert chunk_size_for(n, target) == expected


def test_chunks_round_trip_and_tile_row_major():
    x = torch.arange(24.0).reshape(4, 6)
    tiles = to_chunks(x, 2, 3)
    assert tiles.shape == (4, 2, 3)
    assert torch.equal(tiles[1], torch.tensor([[3.0, 4.0, 5.0], [9.0, 10.0, 11.0]]))  # tile (row 0, col 1)
    assert torch.equal(from_chunks(tiles, x.shape), x)
    conv = torch.arange(2 * 3 * 2 * 2.0).reshape(2, 3, 2, 2)  # > 2 dims fold into (shape[0], rest)
    assert torch.equal(from_chunks(to_chunks(conv, 1, 4), conv.shape), conv)


def _hand_step(rank, world_size):
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = DeMo([p], lr=0.5, momentum_decay=0.5, topk=1, chunk_size=2)
    opt.attach(TorchDistCommunicator())
    p.grad = torch.tensor([3.0, 1.0] if rank == 0 else [1.0, -5.0], dtype=torch.float64)
    opt.step()
    return p.detach().numpy().copy(), opt.state[p]["momentum"].numpy().copy()  # numpy: see test_onebit_adam


def test_one_step_by_hand_at_two_ranks():
    # chunk of 2: DCT([a, b]) = [(a+b)/√2, (a−b)/√2]. δ_r = lr·DCT(g_r) with lr = 0.5:
    #   rank 0: g = [3, 1]  → δ = [√2, √2/2]  → sends coefficient 0 (√2), keeps [0, √2/2]
    #   rank 1: g = [1, −5] → δ = [−√2, 1.5√2] → sends coefficient 1 (1.5√2), keeps [−√2, 0]
    # decoded = [√2, 1.5√2] (no coefficient sent twice) → IDCT = [2.5, −0.5] → sign = [1, −1] → p = [−0.5, 0.5]
    results = run_processes(_hand_step, 2)
    r2 = math.sqrt(2.0)
    for p, _ in results:
        assert np.array_equal(p, [-0.5, 0.5])
    assert np.allclose(results[0][1], [[0.0, r2 / 2]], atol=1e-15, rtol=0)  # float64 round-off
    assert np.allclose(results[1][1], [[-r2, 0.0]], atol=1e-15, rtol=0)


# ---- the authors' algorithm, transcribed from bloc97/DeMo's demo.py with scipy's DCT (param-space momentum) ----
SHAPES = [(12, 10), (6,)]


def _grad(rank, step, shape):
    gen = torch.Generator().manual_seed(1000 * step + 10 * rank + len(shape))
    return torch.randn(shape, generator=gen, dtype=torch.float64)


def _encode(x, h, w):
    tiles = to_chunks(torch.as_tensor(x), h, w).numpy()
    return scipy.fft.dctn(tiles, type=2, norm="ortho", axes=(1, 2)).reshape(tiles.shape[0], -1)


def _decode(coef, h, w, shape):
    tiles = scipy.fft.idctn(coef.reshape(-1, h, w), type=2, norm="ortho", axes=(1, 2))
    return from_chunks(torch.as_tensor(tiles), torch.Size(shape)).numpy()


def reference_demo(world_size, steps, lr, beta, topk, chunk, wd):
    """bloc97's step for every rank: decay δ, δ += lr·g, top-k of the encoded δ, δ −= decode(sent), decode the
    all-gathered (idx, val) with a mean over duplicates, sign, p ← p(1 − lr·wd) − lr·sign."""
    params = [np.zeros(s) for s in SHAPES]
    delta = [[np.zeros(s) for s in SHAPES] for _ in range(world_size)]
    for step in range(steps):
        for i, shape in enumerate(SHAPES):
            a, b = (shape[0], shape[1]) if len(shape) == 2 else (1, shape[0])
            h, w = (chunk_size_for(a, chunk) if a > 1 else 1), chunk_size_for(b, chunk)
            k = min(topk, h * w)
            sums = None
            counts = None
            for r in range(world_size):
                delta[r][i] = beta * delta[r][i] + lr * _grad(r, step, shape).numpy()
                enc = _encode(delta[r][i], h, w)
                idx = np.argsort(-np.abs(enc), axis=1, kind="stable")[:, :k]
                sent = np.zeros_like(enc)
                np.put_along_axis(sent, idx, np.take_along_axis(enc, idx, 1), 1)
                delta[r][i] = delta[r][i] - _decode(sent, h, w, shape)
                mask = np.zeros_like(enc)
                np.put_along_axis(mask, idx, 1.0, 1)
                sums = sent if sums is None else sums + sent
                counts = mask if counts is None else counts + mask
            mean = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)  # scatter_reduce(mean, include_self=False)
            params[i] = params[i] * (1 - lr * wd) - lr * np.sign(_decode(mean, h, w, shape))
    return params


def _run_ours(rank, world_size, steps, lr, beta, topk, chunk, wd):
    ps = [torch.nn.Parameter(torch.zeros(s, dtype=torch.float64)) for s in SHAPES]
    opt = DeMo(ps, lr=lr, momentum_decay=beta, topk=topk, chunk_size=chunk, weight_decay=wd)
    opt.attach(TorchDistCommunicator())
    for step in range(steps):
        for p, s in zip(ps, SHAPES):
            p.grad = _grad(rank, step, s)
        opt.step()
    return [p.detach().numpy().copy() for p in ps], opt.comm.link_bytes_total


@pytest.mark.parametrize("world_size", [2, 3])
def test_matches_the_authors_algorithm_over_steps(world_size):
    args = (12, 0.01, 0.9, 3, 4, 0.1)  # steps, lr, β, topk, chunk, weight decay
    expected = reference_demo(world_size, *args)
    for params, link_bytes in run_processes(_run_ours, world_size, *args):
        for got, want in zip(params, expected):
            # float64 on both sides; the sign step makes any disagreement a jump of 2·lr, far above 1e-9
            assert np.allclose(got, want, atol=1e-9, rtol=0)
        # (12×10: chunks 4×2 → 15 tiles; (6,): chunk 3 → 2 tiles) × topk 3 × (int16 + float64) + 4-byte flag
        per_rank_payload = 4 + (15 + 2) * 3 * (2 + 8)
        assert link_bytes == 12 * (world_size - 1) * per_rank_payload  # all-gather: (W − 1) · payload


def test_sending_everything_is_sign_sgd_of_the_average_gradient():
    # single process: the whole momentum is sent every step, so δ is emptied and the step is sign(lr·g)
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8, 12))
    ref = p.detach().clone()
    opt = DeMo([p], lr=0.05, momentum_decay=0.99, topk=10**6, chunk_size=4, weight_decay=0.2)
    for _ in range(5):
        g = torch.randn(8, 12)
        p.grad = g.clone()
        opt.step()
        ref = ref * (1 - 0.05 * 0.2) - 0.05 * torch.sign(g)
    assert torch.allclose(p.detach(), ref, atol=1e-6)  # float32 weight-decay products; signs agree exactly
    assert opt.state[p]["momentum"].abs().max() < 1e-6  # everything was sent (float32 round-off remains)


def test_bfloat16_values_keep_their_rounding_error_in_the_momentum():
    # one rank, topk 1 of a 1×2 chunk: the sent coefficient is rounded to bfloat16; momentum keeps value − rounded
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = DeMo([p], lr=1.0, topk=1, chunk_size=2, value_dtype="bfloat16")
    coef = 1 + 2**-12  # bfloat16 has 8 significant bits: it rounds to 1.0, so 2⁻¹² stays behind at coefficient 0
    r2 = math.sqrt(2.0)
    p.grad = torch.tensor([(coef + 0.5) / r2, (coef - 0.5) / r2], dtype=torch.float64)  # DCT: [coef, 0.5]
    opt.step()
    expected = torch.tensor([[coef - 1.0, 0.5]], dtype=torch.float64)
    assert torch.allclose(opt.state[p]["momentum"], expected, atol=1e-12)  # float64 DCT round trip


def test_nonfinite_gradient_changes_nothing_and_is_counted():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 4))
    opt = DeMo([p], lr=0.1, topk=2, chunk_size=4, weight_decay=0.1)
    p.grad = torch.randn(4, 4)
    opt.step()
    before_p, before_m = p.detach().clone(), opt.state[p]["momentum"].clone()
    p.grad = torch.full((4, 4), float("nan"))
    opt.step()
    assert torch.equal(p.detach(), before_p) and torch.equal(opt.state[p]["momentum"], before_m)
    assert float(opt.nonfinite_skipped_total) == 1


def test_state_dict_round_trip_continues_exactly():
    def run(split):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(8, 8))
        opt = DeMo([p], lr=0.1, topk=3, chunk_size=4)
        gen = torch.Generator().manual_seed(1)
        for i in range(6):
            if i == split:
                saved = opt.state_dict()
                opt = DeMo([p], lr=0.1, topk=3, chunk_size=4)
                opt.load_state_dict(saved)
            p.grad = torch.randn(8, 8, generator=gen)
            opt.step()
        return p.detach(), opt.state[p]["momentum"]

    (p_a, m_a), (p_b, m_b) = run(None), run(3)
    assert torch.equal(p_a, p_b) and torch.equal(m_a, m_b)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [(dict(lr=0.0), ValueError, "`lr`"), (dict(momentum_decay=1.0), ValueError, "`momentum_decay`"),
     (dict(topk=0), ValueError, "`topk`"), (dict(chunk_size=2.5), TypeError, "`chunk_size` must be an int >= 1"),
     (dict(weight_decay=-1.0), ValueError, "`weight_decay`"), (dict(value_dtype="int8"), ValueError, "`value_dtype`")],
)
def test_bad_arguments_fail_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        DeMo([torch.nn.Parameter(torch.zeros(2))], **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA path: needs a GPU")
def test_cuda_step_matches_cpu():
    torch.manual_seed(0)
    cpu = torch.nn.Parameter(torch.randn(16, 24, dtype=torch.float64))
    gpu = torch.nn.Parameter(cpu.detach().cuda())
    opts = [DeMo([q], lr=0.01, topk=4, chunk_size=8) for q in (cpu, gpu)]
    for _ in range(3):
        g = torch.randn(16, 24, dtype=torch.float64)
        cpu.grad, gpu.grad = g, g.cuda()
        for o in opts:
            o.step()
    assert torch.allclose(gpu.detach().cpu(), cpu.detach(), atol=1e-12)  # float64 on both devices
