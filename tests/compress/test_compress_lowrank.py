"""LowRank: power iteration over steps recovers low-rank matrices, warm start by name, state, dense fallback, errors."""

from __future__ import annotations

import pytest
import torch

from lightning_convergence.compress import LowRank
from lightning_convergence.compress.comm import average_payloads


def _rank2(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(20, 2, generator=gen) @ torch.randn(2, 30, generator=gen)


def _step(comp, x, step, key="w"):
    return average_payloads([comp.compress(x, step, key)], 1, None, None)[0]


def test_warm_start_recovers_a_low_rank_matrix_and_alternates_factors():
    comp, a = LowRank(rank=2), _rank2()
    sizes = []
    for s in range(4):
        out = _step(comp, a, s)
        sizes.append(comp.compress(a, s + 10, "other").nbytes)
    assert torch.allclose(out, a, atol=1e-4)  # exact rank 2: one power-iteration step suffices
    p = comp.compress(a, 4, "w")
    assert p.nbytes in (20 * 2 * 4, 30 * 2 * 4)  # one factor per step: P (n x r) or Q (m x r), float32
    assert comp.summable


def test_without_warm_start_it_is_a_shared_random_projection():
    comp, a = LowRank(rank=2, warm_start=False, seed=1), _rank2()
    one, two = comp.compress(a, 3, "w"), LowRank(rank=2, warm_start=False, seed=1).compress(a, 3, "w")
    assert torch.equal(one.tensors["factor"], two.tensors["factor"])  # same draw on every rank
    assert (one.decompress() - a).norm() <= a.norm() + 1e-4  # a projection never expands


def test_vectors_and_small_matrices_are_sent_dense():
    comp = LowRank(rank=4)
    v = torch.randn(7)
    assert torch.equal(comp.compress(v).decompress(), v)
    small = torch.randn(3, 3)
    assert torch.equal(comp.compress(small).decompress(), small)


def test_state_is_keyed_by_name_and_round_trips():
    comp, a = LowRank(rank=2), _rank2()
    for s in range(3):
        _step(comp, a, s, key="layer.weight")
    state = comp.state_dict()
    assert set(state["factors"]) == {"layer.weight"}
    fresh = LowRank(rank=2)
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
