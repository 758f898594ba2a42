"""LowRank: PowerSGD's two rounds (hand-computed), int8 factors, the one-round variant, state, dense fallback."""

from __future__ import annotations

import pytest
import torch

from lightning_convergence.comm import SingleProcessCommunicator, average_payloads, first_round
from lightning_convergence.compress import LowRank
from tests.helpers.fake_comm import PlusOther


def _rank2(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(20, 2, generator=gen) @ torch.randn(2, 30, generator=gen)


def _step(comp, x, step, key="w"):
    return average_payloads([comp.compress(x, step, key)], SingleProcessCommunicator())[0]


def test_warm_start_recovers_a_low_rank_matrix_and_alternates_factors():
    comp, a = LowRank(rank=2, rounds=1), _rank2()
    sizes = []
    for s in range(4):
        out = _step(comp, a, s)
        sizes.append(comp.compress(a, s + 10, "other").nbytes)
    assert torch.allclose(out, a, atol=1e-4)  # exact rank 2: one power-iteration step suffices
    p = comp.compress(a, 4, "w")
    assert p.nbytes in (20 * 2 * 4, 30 * 2 * 4)  # one factor per step: P (n x r) or Q (m x r), float32
    assert comp.summable


def test_without_warm_start_it_is_a_shared_random_projection():
    comp, a = LowRank(rank=2, warm_start=False, seed=1, rounds=1), _rank2()
    one, two = comp.compress(a, 3, "w"), LowRank(rank=2, warm_start=False, seed=1, rounds=1).compress(a, 3, "w")
    assert torch.equal(one.tensors["factor"], two.tensors["factor"])  # same draw on every rank
    assert (one.decompress() - a).norm() <= a.norm() + 1e-4  # a projection never expands


def test_vectors_and_small_matrices_are_sent_dense():
    comp = LowRank(rank=4)
    v = torch.randn(7)
    assert torch.equal(comp.compress(v).decompress(), v)
    small = torch.randn(3, 3)
    assert torch.equal(comp.compress(small).decompress(), small)


def test_state_is_keyed_by_name_and_round_trips():
    comp, a = LowRank(rank=2, rounds=1), _rank2()
    for s in range(3):
        _step(comp, a, s, key="layer.weight")
    state = comp.state_dict()
    assert set(state["factors"]) == {"layer.weight"}
    fresh = LowRank(rank=2, rounds=1)
    fresh.load_state_dict(state)
    x = _rank2(5)
    assert torch.equal(fresh.compress(x, 3, "layer.weight").tensors["factor"], comp.compress(x, 3, "layer.weight")
                       .tensors["factor"])
    with pytest.raises(RuntimeError, match="version"):
        fresh.load_state_dict({**state, "version": 7})


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [({"rank": 0}, ValueError, "rank"), ({"rank": 1.0}, TypeError, "rank"),
     ({"min_compression_rate": 0}, ValueError, "min_compression_rate")],
)
def test_bad_lowrank_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=f"`{match}`"):
        LowRank(**kwargs)


def _two_rank_powersgd_step(comps, mats, step, key="w"):
    """One rounds=2 step of two simulated ranks through first_round + average_payloads (fake all-reduces)."""
    firsts = [c.prepare(m, step, key) for c, m in zip(comps, mats)]
    for r, c in enumerate(comps):  # round one: each rank's all-reduce returns the sum of both ranks' P_i
        first_round(c, [(key, mats[r], step)], PlusOther(firsts[1 - r].tensors["factor"]))
    seconds = [c.compress(m, step, key) for c, m in zip(comps, mats)]
    outs = [average_payloads([seconds[r]], PlusOther(seconds[1 - r].tensors["factor"]))[0] for r in range(2)]
    return firsts, seconds, outs


def test_two_rounds_are_powersgd_algorithm_1_on_two_ranks():
    gen = torch.Generator().manual_seed(3)
    mats = [torch.randn(12, 9, generator=gen) for _ in range(2)]
    comps = [LowRank(rank=2, rounds=2, seed=4), LowRank(rank=2, rounds=2, seed=4)]
    q0 = comps[0]._factor_random("w", 12, 9, 0, torch.device("cpu"))[0]  # the shared initial right factor
    firsts, seconds, outs = _two_rank_powersgd_step(comps, mats, 0)
    mean = (mats[0] + mats[1]) / 2
    p_hat = torch.linalg.qr(mean @ q0).Q  # hand-computed Algorithm 1: P = M Q, orthogonalise, Q = Mᵀ P̂
    expected = p_hat @ (mean.T @ p_hat).T
    for out in outs:
        assert torch.allclose(out, expected, atol=1e-5)
    for r in range(2):  # each rank's own message stands for P̂ P̂ᵀ M_i (what error feedback subtracts)
        assert torch.allclose(seconds[r].decompress(), p_hat @ p_hat.T @ mats[r], atol=1e-5)
        assert firsts[r].nbytes + seconds[r].nbytes == 2 * (12 + 9) * 4  # r·(n + m) float32 per step
    # warm start: the next step's first round uses orth(mean Q_i) as Q
    q1 = torch.linalg.qr(mean.T @ p_hat).Q
    nxt = comps[0].prepare(mats[0], 1, "w")
    assert torch.allclose(nxt.tensors["factor"], mats[0] @ q1, atol=1e-4)


def test_two_rounds_recover_a_low_rank_matrix_in_one_step_and_need_their_first_round():
    a = _rank2()
    comps = [LowRank(rank=2, rounds=2), LowRank(rank=2, rounds=2)]
    _, _, outs = _two_rank_powersgd_step(comps, [a, a], 0)
    assert torch.allclose(outs[0], a, atol=1e-4)  # exact rank 2: one two-round step suffices (rounds=1 needs more)
    assert comps[0].prepare(torch.randn(7), 0, "v") is None  # vectors stay dense, no first round
    with pytest.raises(RuntimeError, match="first round"):
        comps[0].compress(a, 1, "w")
    with pytest.raises(ValueError, match="`rounds`"):
        LowRank(rounds=3)


def test_8bit_factors_are_summable_and_rounded_in_transit_only():
    gen = torch.Generator().manual_seed(7)
    q8, fp = LowRank(rank=4, rounds=2, factor_bits=8), LowRank(rank=4, rounds=2)
    assert q8.summable and q8.transport == "quantized_all_reduce" and fp.transport == "all_reduce"
    bias = torch.randn(30, generator=gen)  # sent without factorisation: int8 with one scale, no first round
    dense = q8.compress(bias, 0, "b")
    assert q8.prepare(bias, 0, "b") is None and torch.equal(dense.decompress(), bias)  # the float message itself
    with pytest.raises(ValueError, match="`factor_bits`"):
        LowRank(factor_bits=4)
