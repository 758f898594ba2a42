"""The communication layer: link-byte formulas by hand, real gloo collectives at 2, 3 and 4 ranks (results and
counted bytes), payload averaging for every transport, and the 8-bit reduce-scatter + all-gather."""

from __future__ import annotations

import pytest
import torch

from lightning_convergence.comm import (
    BLOCK,
    SingleProcessCommunicator,
    TorchDistCommunicator,
    all_gather_link_bytes,
    all_reduce_link_bytes,
    all_to_all_link_bytes,
    average_payloads,
    broadcast_link_bytes,
    first_round,
    payload_bytes,
    quantized_link_bytes,
    quantized_mean_async,
)
from lightning_convergence.compress import QSGD, Compose, CyclicTopK, Identity, LowRank, RandK, ScaledSign, TopK
from tests.helpers.dist import run_processes
from tests.helpers.fake_comm import PlusOther


def test_link_byte_formulas_by_hand():
    # ring all-reduce of 1200 bytes: 2 chunks of 600 at W=2 -> 1200; W=4: 6 sends of 300 -> 1800
    assert (all_reduce_link_bytes(1200, 1), all_reduce_link_bytes(1200, 2), all_reduce_link_bytes(1200, 4)) == (
        0, 1200, 1800)
    assert all_gather_link_bytes(100, 8) == 700 and all_to_all_link_bytes(800, 4) == 600
    # binomial tree from root 0 at W=5: 0 -> 1, 2, 4; 1 -> 3; the others are leaves; in total W-1 copies
    assert [broadcast_link_bytes(10, 5, r, 0) for r in range(5)] == [30, 10, 0, 0, 0]
    for w in (2, 3, 4, 7, 8):
        for root in range(w):
            assert sum(broadcast_link_bytes(10, w, r, root) for r in range(w)) == 10 * (w - 1)


def test_average_payloads_with_a_fake_partner():
    mine, theirs = torch.tensor([1.0, -2.0, 3.0, 0.5]), torch.tensor([3.0, 2.0, -1.0, 0.5])
    (mean,) = average_payloads([Identity().compress(mine)], PlusOther(theirs))
    torch.testing.assert_close(mean, torch.tensor([2.0, 0.0, 1.0, 0.5]))
    # Top-K of 2 travels by all-gather: the partner's bytes are its values and indices
    blob = payload_bytes([TopK(0.5).compress(theirs)])
    (mean,) = average_payloads([TopK(0.5).compress(mine)], PlusOther(blob))
    torch.testing.assert_close(mean, torch.tensor([1.5, 0.0, 1.5, 0.0]))  # ([0,-2,3,0] + [3,2,0,0]) / 2
    assert average_payloads([Identity().compress(mine)], SingleProcessCommunicator())[0].equal(mine)


def _collectives(rank: int, world_size: int) -> dict:
    comm = TorchDistCommunicator()
    out, counted = {}, []

    def track():
        counted.append(comm.link_bytes_total - sum(counted))

    x = torch.arange(12, dtype=torch.float32) + rank
    out["sum"] = comm.all_reduce_sum(x.clone()).tolist()
    track()
    out["gather"] = comm.all_gather(torch.full((3,), float(rank))).__len__()
    track()
    chunks = torch.arange(4 * world_size, dtype=torch.float32) + 100 * rank
    out["a2a"] = comm.all_to_all(chunks).tolist()
    track()
    b = torch.full((5,), float(rank), dtype=torch.float64)
    out["bcast"] = comm.broadcast(b, root=world_size - 1).tolist()
    track()
    return {"out": out, "counted": counted}


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_collectives_and_their_counted_link_bytes(world_size):
    res = run_processes(_collectives, world_size)
    w = world_size
    for r, got in enumerate(res):
        assert got["out"]["sum"] == [float(w * i + w * (w - 1) / 2) for i in range(12)]
        assert got["out"]["gather"] == w
        assert got["out"]["a2a"] == [float(100 * s + 4 * r + j) for s in range(w) for j in range(4)]
        assert got["out"]["bcast"] == [float(w - 1)] * 5
        # independent of our formulas: ring all-reduce moves 2(W-1) chunks of n/W; an all-gather forwards W-1
        # messages; an all-to-all keeps its own chunk
        assert got["counted"][:3] == [2 * (w - 1) * 48 // w, (w - 1) * 12, (w - 1) * 16]
    assert sum(got["counted"][3] for got in res) == (w - 1) * 40  # the broadcast reaches W-1 ranks


COMPRESSORS = [Identity(), TopK(0.3), RandK(0.3), ScaledSign(), QSGD(3), Compose(TopK(0.3), QSGD(127))]


def _grads(rank: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(rank)
    return [torch.randn(7, generator=gen), torch.randn(2, 3, generator=gen)]


def _payloads(rank: int):
    return [c.compress(g, 5, f"p{i}") for i, c in enumerate(COMPRESSORS) for g in _grads(rank)]


def _average(rank: int, world_size: int):
    comm = TorchDistCommunicator()
    out = average_payloads(_payloads(rank), comm)
    return [o.tolist() for o in out], comm.link_bytes_total


@pytest.mark.parametrize("world_size", [2, 3])
def test_average_payloads_on_real_ranks_for_every_transport(world_size):
    res = run_processes(_average, world_size)
    per_rank = [_payloads(r) for r in range(world_size)]
    expected = [sum(p[i].decompress() for p in per_rank) / world_size for i in range(len(per_rank[0]))]
    summ = sum(p.nbytes for p in per_rank[0] if p.compressor.summable)
    gath = sum(p.nbytes for p in per_rank[0] if not p.compressor.summable)
    for out, sent in res:
        assert out == res[0][0]  # bit-identical on every rank
        for o, e in zip(out, expected):
            assert torch.allclose(torch.tensor(o), e, atol=1e-6)  # float32 sums in another order
        assert sent == all_reduce_link_bytes(summ, world_size) + all_gather_link_bytes(gath, world_size)


def _quantized(rank: int, world_size: int, numel: int):
    comm = TorchDistCommunicator()
    x = torch.randn(numel, generator=torch.Generator().manual_seed(10 + rank)) * (rank + 1)
    mean = quantized_mean_async(x, comm).wait()
    return mean.tolist(), comm.link_bytes_total


@pytest.mark.parametrize("world_size", [2, 4])
def test_quantized_mean_is_identical_everywhere_close_to_the_mean_and_a_quarter_of_the_bytes(world_size):
    numel = 3000
    res = run_processes(_quantized, world_size, numel)
    xs = [torch.randn(numel, generator=torch.Generator().manual_seed(10 + r)) * (r + 1) for r in range(world_size)]
    exact = torch.stack(xs).mean(0)
    for mean, sent in res:
        assert mean == res[0][0]  # every rank decodes the same gathered codes
        # two roundings, each at most half a step of max|block|/127; the blocks' max is at most max|x_r|
        bound = max(x.abs().max() for x in xs) / 127
        assert (torch.tensor(mean) - exact).abs().max() <= bound
        padded = -(-numel // (world_size * BLOCK)) * world_size * BLOCK
        assert sent == quantized_link_bytes(numel, world_size)
        float_bytes = all_reduce_link_bytes(4 * numel, world_size)
        assert float_bytes / sent > 3.5 * numel / padded  # ~3.9x fewer at every W (padding aside)


def _cyclic(rank: int, world_size: int, steps: int):
    comm = TorchDistCommunicator()
    comp = CyclicTopK(0.25)
    comp.bind(rank, world_size, comm.backend, "cpu")
    outs = []
    for step in range(steps):
        x = torch.randn(16, generator=torch.Generator().manual_seed(100 * step + rank))
        first_round(comp, [("w", x, step)], comm)
        (mean,) = average_payloads([comp.compress(x, step, "w")], comm)
        outs.append(mean.tolist())
    return outs, comm.link_bytes_total


@pytest.mark.parametrize("world_size", [3, 4])
def test_cyclic_topk_uses_the_leaders_indices_in_rotation_and_sums_values(world_size):
    steps = world_size + 1
    res = run_processes(_cyclic, world_size, steps)
    for step in range(steps):
        xs = [torch.randn(16, generator=torch.Generator().manual_seed(100 * step + r)) for r in range(world_size)]
        leader = step % world_size
        idx = torch.topk(xs[leader].abs(), 4).indices  # k = ceil(0.25 * 16)
        expected = torch.zeros(16)
        expected[idx] = torch.stack(xs).mean(0)[idx]
        for outs, _ in res:
            assert torch.allclose(torch.tensor(outs[step]), expected, atol=1e-6)
    # per step: a broadcast of 4 int32 indices (W-1 copies in all) and a ring all-reduce of 4 float32 values
    total = sum(sent for _, sent in res)
    assert total == steps * ((world_size - 1) * 16 + world_size * all_reduce_link_bytes(16, world_size))


def test_cyclic_topk_needs_its_first_round_and_is_top_k_alone():
    comp = CyclicTopK(0.5)
    x = torch.tensor([3.0, -1.0, 0.5, -4.0])
    with pytest.raises(RuntimeError, match="first round"):
        comp.compress(x, 0, "w")
    first_round(comp, [("w", x, 0)], SingleProcessCommunicator())
    torch.testing.assert_close(comp.compress(x, 0, "w").decompress(), torch.tensor([3.0, 0.0, 0.0, -4.0]))
    assert comp.contraction(4) == 0.5  # one rank: plain Top-K
    with pytest.raises(ValueError, match="`k_fraction`"):
        CyclicTopK(1.5)


def test_8bit_transport_refuses_cuda_tensors_on_gloo():
    with pytest.raises(ValueError, match="`factor_bits`"):
        LowRank(rank=2, factor_bits=8).bind(0, 2, "gloo", "cuda")
    LowRank(rank=2, factor_bits=8).bind(0, 2, "nccl", "cuda")  # NCCL runs the all-to-all


# half the widest grid gap over the grid's top value, from the literal grids (not the module's): the per-entry
# rounding error in units of max|block|
_HALF_STEP = {"int8": 0.5 / 127, "fp4_e2m1": 1.0 / 6.0, "fp4_e3m0": 0.25 / 1.0}


def _quantized_codec(rank: int, world_size: int, numel: int, fmt: str):
    from lightning_convergence.comm.quantized import QuantizedMean
    from lightning_convergence.compress import BlockQuantizer

    comm = TorchDistCommunicator()
    x = torch.randn(numel, generator=torch.Generator().manual_seed(20 + rank)) * (rank + 1)
    pending = QuantizedMean(x, comm, BlockQuantizer(fmt, 16))
    after_first = comm.link_bytes_total  # the all-to-all only
    pending.forward()
    return pending.wait().tolist(), after_first, comm.link_bytes_total


@pytest.mark.parametrize("fmt", ["int8", "fp4_e2m1", "fp4_e3m0"])
def test_unified_quantized_mean_is_bit_identical_on_three_ranks_and_within_the_codec_error(fmt):
    from lightning_convergence.comm.links import quantized_mean_link_bytes

    numel, w, block = 100, 3, 16
    res = run_processes(_quantized_codec, w, numel, fmt)
    xs = [torch.randn(numel, generator=torch.Generator().manual_seed(20 + r)) * (r + 1) for r in range(w)]
    exact = torch.stack(xs).mean(0)
    padded = 3 * 3 * block  # 100 entries → 3 chunks of 3 blocks of 16 (144)
    amax = torch.stack([torch.cat([x, x.new_zeros(padded - numel)]).reshape(-1, block).abs().amax(1) for x in xs])
    # two roundings (each rank's chunks, then the mean chunk), each within half a grid gap of its block's scale;
    # every decoded value, and so the mean, stays within max_r max|block_r|
    bound = (2 * _HALF_STEP[fmt] * amax.max(0).values).repeat_interleave(block)[:numel]
    for mean, first, total in res:
        assert mean == res[0][0]  # every rank decodes the same gathered codes
        assert ((torch.tensor(mean) - exact).abs() <= bound * (1 + 1e-5)).all()  # 1e-5: float32 scale divisions
        bits = 8 if fmt == "int8" else 4
        chunk_bytes = 3 * block * bits // 8 + 4 * 3  # one chunk: codes + three float32 scales
        assert first == (w - 1) * chunk_bytes  # all-to-all: the W−1 chunks meant for the others
        assert total == 2 * (w - 1) * chunk_bytes == quantized_mean_link_bytes(numel, w, bits, block)


def _flat_helpers(rank: int, world_size: int):
    comm = TorchDistCommunicator()
    tensors = [torch.full((2, 3), float(rank)), torch.full((4,), 10.0 * rank, dtype=torch.float64)]
    comm.all_reduce_mean_flat_(tensors)
    after_mean = comm.link_bytes_total
    bcast = [torch.full((3,), float(rank)), torch.tensor([rank], dtype=torch.int64)]
    comm.broadcast_flat_(bcast, root=1)
    return [t.tolist() for t in tensors], [t.tolist() for t in bcast], after_mean, tensors[1].dtype


def test_flat_mean_and_flat_broadcast_helpers_on_three_ranks():
    for means, bcast, after_mean, dtype in run_processes(_flat_helpers, 3):
        assert means == [[[1.0] * 3] * 2, [10.0] * 4] and dtype == torch.float64  # mean of 0, 1, 2; dtype kept
        assert after_mean == all_reduce_link_bytes(10 * 8, 3)  # one all-reduce of 10 entries (promoted to float64)
        assert bcast == [[1.0] * 3, [1]]  # root 1's values, the int64 buffer exactly
