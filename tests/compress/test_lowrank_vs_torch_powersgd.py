"""LowRank(rounds=2, error="average") + EF14 equals torch's ``powerSGD_hook`` step by step on two gloo ranks, and the
compress criterion is torch's ``_should_compress``."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd

from lightning_convergence.comm import TorchDistCommunicator
from lightning_convergence.comm.payloads import average_payloads, first_round
from lightning_convergence.compress import LowRank
from lightning_convergence.feedback import EF14, EF21
from tests.helpers.dist import run_processes

RANK, START, STEPS, SEED = 2, 2, 12, 0


def _model() -> nn.Module:
    torch.manual_seed(0)
    # 12x16 is factorised at rank 2 (2·2·28 = 112 < 192); 6x12 is not under torch's rule (2·2·18 = 72, not < 72),
    # though max(n, m)·r would have factorised it (2·12·2 = 48 ≤ 72); biases are sent dense.
    return nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 6))


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)  # different data per rank and step
    return torch.randn(8, 16, generator=g), torch.randn(8, 6, generator=g)


def _torch_initial_q(m: int, r: int) -> torch.Tensor:
    """The first Q torch's hook draws for the only factorised matrix of the bucket: ``PowerSGDState.rng`` (numpy,
    seeded by ``random_seed``) seeds torch's RNG, then ``randn(1, m, r)`` is orthonormalised (QR, epsilon 0)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(np.random.RandomState(SEED).randint(1_000_000_000))
        q = torch.randn(1, m, r)
    return torch.linalg.qr(q).Q[0]


def _ranks(rank: int, world_size: int, error: str):
    model = _model()
    local = copy.deepcopy(model)
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=100)  # one bucket (NOTES: gloo needs it)
    state = psgd.PowerSGDState(process_group=None, matrix_approximation_rank=RANK, start_powerSGD_iter=START,
                               min_compression_rate=2, use_error_feedback=True, warm_start=True,
                               orthogonalization_epsilon=0, random_seed=SEED, batch_tensors_with_same_shape=False)
    names = [n for n, _ in local.named_parameters()]
    name_of = {id(p): n for n, p in model.named_parameters()}
    bucket_names: list[str] = []

    def hook(state, bucket):  # torch's hook, noting the bucket's parameter order (the layout of its error buffer)
        bucket_names[:] = [name_of[id(p)] for p in bucket.parameters()]
        return psgd.powerSGD_hook(state, bucket)

    ddp.register_comm_hook(state, hook)

    comp, rule = LowRank(rank=RANK, rounds=2, error=error), EF14()
    rule.check_compressor(comp)
    start = {"version": 1, "factors": {"0.weight": _torch_initial_q(16, RANK)}, "left": {"0.weight": False}}
    comp.load_state_dict(start)

    comm = TorchDistCommunicator()
    torch_out, ours, torch_err, our_err = [], [], [], []
    for step in range(STEPS):
        x, y = _batch(rank, step)
        ddp.zero_grad()
        nn.functional.mse_loss(ddp(x), y).backward()
        torch_out.append([p.grad.clone() for p in ddp.parameters()])
        grads = torch.autograd.grad(nn.functional.mse_loss(local(x), y), list(local.parameters()))
        if step < START:  # torch's plain all-reduce before start_powerSGD_iter (our strategy's start_step)
            means = [comm.all_reduce_sum(g.clone()) / world_size for g in grads]
        else:
            items = [(n, rule.compressor_input(n, g), rule.steps.get(n, 0)) for n, g in zip(names, grads)]
            first_round(comp, items, comm)
            payloads = [rule.message(n, g, comp) for n, g in zip(names, grads)]
            means = average_payloads(payloads, comm)
            means = [rule.update(n, m.reshape(g.shape)) for n, m, g in zip(names, means, grads)]
        ours.append(means)
        if step >= START:  # the per-rank error state after this step, in parameter order
            flat = state.error_dict[0].split([dict(local.named_parameters())[n].numel() for n in bucket_names])
            err = dict(zip(bucket_names, flat))
            torch_err.append([err[n].reshape(g.shape) for n, g in zip(names, grads)])
            our_err.append([rule.buffers["e"].get(n, torch.zeros_like(g)) for n, g in zip(names, grads)])
    as_arrays = lambda steps: [[t.detach().numpy().copy() for t in ts] for ts in steps]  # noqa: E731
    # numpy copies: tensors would travel through shared memory that dies with the rank
    return as_arrays(torch_out), as_arrays(ours), as_arrays(torch_err), as_arrays(our_err)


@pytest.mark.parametrize("error", ["average", "projection"])
def test_two_rank_lowrank_ef14_equals_torch_powersgd_hook(error):
    raw = run_processes(_ranks, 2, error)
    results = [[[[torch.from_numpy(a) for a in ts] for ts in steps] for steps in r] for r in raw]
    for rank_out in results:
        torch_out, ours, torch_err, our_err = rank_out
        for step in range(STEPS):
            for a, b in zip(torch_out[step], results[0][0][step]):
                assert torch.equal(a, b)  # DDP hands every rank the same average
            # float32 sums of 8-16 products in another order (bmm vs matmul), QR of the same inputs: 1e-5 absolute
            # on gradients of size ~0.1-1. Both error definitions give torch's average: the messages are linear in
            # each rank's input and the errors of the ranks sum to the same total.
            assert all(torch.allclose(o, t, atol=1e-5) for o, t in zip(ours[step], torch_out[step])), f"step {step}"
        # The per-rank error state: torch's `input − P̂·mean(Q)ᵀ` (and `x_i − mean x` for dense tensors).
        same = [all(torch.allclose(o, t, atol=1e-5) for o, t in zip(a, b)) for a, b in zip(our_err, torch_err)]
        if error == "average":
            assert all(same)
        else:  # the projection error is the rank's own residual: another per-rank state from the first step on
            assert not any(same)


@pytest.mark.parametrize("shape", [(64, 64), (6, 12), (12, 16), (3, 100), (100, 3), (40, 40), (8, 200), (33, 17)])
@pytest.mark.parametrize("rank", [1, 2, 4, 32])
def test_compress_criterion_is_torchs(shape, rank):
    """Two rounds send ``r·(n + m)`` floats; torch compresses iff that is ``min_compression_rate`` times smaller."""
    n, m = shape
    expected = psgd._should_compress(n, m, min(n, m, rank), 2)[0]
    assert LowRank(rank=rank, rounds=2)._compressible(torch.Size(shape)) == expected


def test_64x64_at_rank_32_is_sent_dense():
    # r·(n + m) = 32·128 = 4096 floats over two rounds: exactly the dense size, so no compression at all.
    assert not LowRank(rank=32)._compressible(torch.Size((64, 64)))
    assert LowRank(rank=8)._compressible(torch.Size((64, 64)))  # 8·128 = 1024, 4x smaller


def test_average_error_needs_ef14():
    with pytest.raises(ValueError, match="EF21: `compressor` must be a compressor with `error` 'projection'"):
        EF21().check_compressor(LowRank(error="average"))
    with pytest.raises(ValueError, match="error"):
        LowRank(error="torch")
