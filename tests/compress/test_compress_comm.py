"""average_payloads: fake collectives (hand-checkable) and two real gloo ranks; bytes on the wire = payload sizes."""

from __future__ import annotations

import torch

from lightning_convergence.compress import QSGD, Compose, Identity, RandK, ScaledSign, TopK
from lightning_convergence.compress.comm import _to_bytes, average_payloads, dist_collectives
from tests.helpers.dist import run_processes

COMPRESSORS = [Identity(), TopK(0.3), RandK(0.3), ScaledSign(), QSGD(3), Compose(TopK(0.3), QSGD(127))]


def _grads(rank: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(rank)
    return [torch.randn(7, generator=gen), torch.randn(2, 3, generator=gen)]


def _payloads(rank: int):
    return [c.compress(g, 5, f"p{i}") for i, c in enumerate(COMPRESSORS) for g in _grads(rank)]


def test_average_payloads_with_fake_collectives():
    mine, theirs = _payloads(0), _payloads(1)
    sent = []

    def all_reduce(t):
        other = torch.cat([v.reshape(-1) for p in theirs if p.compressor.summable for v in p.tensors.values()])
        return t + other

    def all_gather(t):
        sent.append(t.numel())
        return [t, _to_bytes([p for p in theirs if not p.compressor.summable])]

    out = average_payloads(mine, 2, all_reduce, all_gather, rank=0)
    for o, a, b in zip(out, mine, theirs):
        assert torch.allclose(o, (a.decompress() + b.decompress()) / 2, atol=1e-6)
    assert sent == [sum(p.nbytes for p in mine if not p.compressor.summable)]


def _real(rank: int, world_size: int):
    all_reduce, all_gather = dist_collectives()
    wire = []

    def counting_gather(t):
        wire.append(t.numel() * t.element_size())
        return all_gather(t)

    def counting_reduce(t):
        wire.append(t.numel() * t.element_size())
        return all_reduce(t)

    payloads = _payloads(rank)
    out = average_payloads(payloads, world_size, counting_reduce, counting_gather, rank)
    return [o.tolist() for o in out], sum(wire), sum(p.nbytes for p in payloads)  # plain lists cross the queue


def test_average_payloads_two_gloo_ranks():
    results = run_processes(_real, 2)
    expected = [(a.decompress() + b.decompress()) / 2 for a, b in zip(_payloads(0), _payloads(1))]
    for out, wire, nbytes in results:
        assert wire == nbytes  # what the collectives carried equals the payloads' own byte count
        for o, e in zip(out, expected):
            assert torch.allclose(torch.tensor(o), e, atol=1e-6)
