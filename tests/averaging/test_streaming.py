"""Streaming DiLoCo core: reduction to DiLoCo, the fragment schedule, hand-computed merges, quantization bounds,
resume with a fragment in flight. One process; the other rank is scripted (torchft's fake-collective trick)."""

from __future__ import annotations

import pytest
import torch

from lightning_convergence.averaging import DiLoCo, StreamingDiLoCo
from lightning_convergence.averaging.streaming import fragment_due, partition_fragments
from lightning_convergence.comm import SingleProcessCommunicator
from lightning_convergence.comm.links import all_reduce_link_bytes, quantized_mean_link_bytes
from lightning_convergence.compress import BlockQuantizer
from tests.averaging.test_averaging_cores import TwoRankFake


class TwoRankAsync(TwoRankFake):
    """The same scripted second rank, with the asynchronous sum the streaming core uses."""

    def all_reduce_sum_async(self, tensor):
        fut = torch.futures.Future()
        tensor.add_(self._other(tensor))
        fut.set_result(tensor)
        return fut

    def all_to_all_async(self, blob):
        # the partner mirrors us: it sends us its chunk 0, equal to ours, and we keep our chunk 1 as its reply later
        mine, theirs = blob.chunk(2)
        self._sent_to_partner = theirs.clone()
        fut = torch.futures.Future()
        fut.set_result(torch.cat([mine, mine]))
        return fut

    def all_gather_async(self, blob):
        fut = torch.futures.Future()
        fut.set_result(torch.cat([blob, self._sent_to_partner]))  # approximately the partner's encoded mean chunk
        return fut


def _other(t):
    # the scripted rank's pseudo-gradient: a fixed function of ours, so both cores see the same partner
    return 0.5 * t + 0.01


def _model(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, generator=g), torch.randn(3, generator=g), torch.randn(2, 4, generator=g),
            torch.randn(5, generator=g)]


def _inner_step(params, step):
    g = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.sub_(0.05 * torch.randn(p.shape, generator=g))


def _run(outer, comm, steps, params=None, start=1):
    params = params if params is not None else _model()
    if start == 1:
        outer.init_state(params)
    for step in range(start, steps + 1):
        _inner_step(params, step)
        outer.sync(params, comm, step) if isinstance(outer, StreamingDiLoCo) or step % 8 == 0 else None
    return params


@pytest.mark.parametrize("eager", [False, True])
def test_one_fragment_no_overlap_full_precision_equals_diloco_exactly(eager):
    ref = _run(DiLoCo(lr=0.7, momentum=0.9), TwoRankFake(_other), 40)
    ours = _run(StreamingDiLoCo(num_fragments=1, sync_every=8, overlap_steps=0, mixing=0.0, eager=eager,
                                quantization=None), TwoRankAsync(_other), 40)
    for a, b in zip(ref, ours):
        assert torch.equal(a, b)  # bit-identical: same float32 operations in the same order


def test_schedule_hand_cases():
    # H=8, P=2: offsets ⌊8·1/2⌋=4 and ⌊8·2/2⌋ mod 8=0 → steps 4, 8, 12, 16
    assert [fragment_due(s, 8, 2) for s in range(1, 17)] == [None] * 3 + [0] + [None] * 3 + [1] + \
        [None] * 3 + [0] + [None] * 3 + [1]
    # H=10, P=3: ⌊10/3⌋=3, ⌊20/3⌋=6, 10 mod 10=0
    assert [s for s in range(1, 11) if fragment_due(s, 10, 3) is not None] == [3, 6, 10]
    assert [fragment_due(s, 10, 3) for s in (3, 6, 10)] == [0, 1, 2]
    assert fragment_due(0, 10, 3) is None  # nothing before the first step


@pytest.mark.parametrize("num_fragments,sync_every", [(1, 1), (1, 7), (2, 8), (3, 10), (4, 4), (4, 13)])
@pytest.mark.parametrize("mode", ["strided", "contiguous"])
def test_every_parameter_synced_exactly_once_per_round(num_fragments, sync_every, mode):
    params = [torch.zeros(n) for n in (5, 1, 7, 3, 2, 9, 4)]
    outer = StreamingDiLoCo(num_fragments=num_fragments, sync_every=sync_every, overlap_steps=0, partition=mode,
                            quantization=None)
    outer.init_state(params)
    for r in range(3):  # three consecutive rounds (windows of H steps), driven through the core's own pipeline
        window = range(r * sync_every + 1, (r + 1) * sync_every + 1)
        merged = [outer.sync(params, SingleProcessCommunicator(), s) for s in window]
        synced = sorted(i for st in merged if st is not None for i in outer.fragments[st.fragment])
        assert synced == list(range(len(params)))


def test_partition_hand_cases():
    assert partition_fragments([1] * 5, 2, "strided") == [[0, 2, 4], [1, 3]]
    assert partition_fragments([10, 10, 10, 10], 2, "contiguous") == [[0, 1], [2, 3]]
    assert partition_fragments([100, 1, 1], 3, "contiguous") == [[0], [1], [2]]  # never an empty fragment
    with pytest.raises(ValueError, match="num_fragments"):
        partition_fragments([1, 1], 3)


def test_overlapped_merge_hand_computed():
    # one parameter, one fragment, H=4, τ=1, α=0.5, lr 0.7, μ 0.9; the scripted other rank sends 0.2
    theta = [torch.tensor([1.0])]
    outer = StreamingDiLoCo(num_fragments=1, sync_every=4, overlap_steps=1, mixing=0.5, quantization=None)
    outer.init_state(theta)
    comm = TwoRankAsync(torch.tensor([0.2]))
    theta[0].fill_(0.6)  # after step 4 the replica sits at 0.6: Δ = 1.0 − 0.6 = 0.4
    assert outer.sync(theta, comm, 4) is None  # launched, not merged
    assert theta[0].item() == pytest.approx(0.6)
    theta[0].fill_(0.5)  # step 5 moves the replica on while the mean travels
    stats = outer.sync(theta, comm, 5)
    # mean 0.3; b = 0.3; d = 0.3 + 0.9·0.3 = 0.57; anchor = 1 − 0.7·0.57 = 0.601; merge 0.5·0.601 + 0.5·0.5
    assert outer.anchors[0].item() == pytest.approx(0.601, abs=1e-6)  # float32 rounding
    assert theta[0].item() == pytest.approx(0.5505, abs=1e-6)
    assert stats is not None and stats.fragment == 0 and not stats.skipped


def test_eager_update_hand_computed():
    # as above with eager=True: at launch the replica jumps to the proxy outer step, and keeps its τ-step progress
    theta = [torch.tensor([1.0])]
    outer = StreamingDiLoCo(num_fragments=1, sync_every=4, overlap_steps=1, eager=True, quantization=None)
    outer.init_state(theta)
    comm = TwoRankAsync(torch.tensor([0.2]))
    theta[0].fill_(0.6)
    outer.sync(theta, comm, 4)
    # first round: proxy Δ̃ = Δ = 0.4; b' = 0.4; d = 0.4 + 0.36 = 0.76; start = 1 − 0.532 = 0.468
    assert theta[0].item() == pytest.approx(0.468, abs=1e-6)
    theta[0].sub_(0.1)  # one inner step from the proxy start
    outer.sync(theta, comm, 5)
    assert theta[0].item() == pytest.approx(0.601 - 0.1, abs=1e-6)  # true anchor 0.601 plus the local progress
    # the others' previous pseudo-gradient is kept for the next proxy: mean − own/W = 0.3 − 0.2 = 0.1
    assert outer.others_prev[0].item() == pytest.approx(0.1, abs=1e-6)
    theta[0].fill_(0.3)  # next round: Δ = 0.601 − 0.3 = 0.301; proxy = 0.301/2 + 0.1 = 0.2505
    outer.sync(theta, comm, 8)
    b = 0.9 * 0.3 + 0.2505
    assert theta[0].item() == pytest.approx(0.601 - 0.7 * (0.2505 + 0.9 * b), abs=1e-6)


def test_nonfinite_mean_drops_the_fragment_round():
    theta = [torch.tensor([1.0, 2.0])]
    outer = StreamingDiLoCo(num_fragments=1, sync_every=2, overlap_steps=1, quantization="int8", block_size=8)
    outer.init_state(theta)
    theta[0].fill_(float("nan"))
    outer.sync(theta, SingleProcessCommunicator(), 2)
    stats = outer.sync(theta, SingleProcessCommunicator(), 3)
    assert stats.skipped
    assert torch.equal(theta[0], torch.tensor([1.0, 2.0]))  # back on the anchor
    assert torch.equal(outer.momentum_buffers[0], torch.zeros(2))  # the non-finite mean never entered momentum


@pytest.mark.parametrize("fmt,grid", [
    ("int8", None),
    ("fp4_e2m1", [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]),
    ("fp4_e3m0", [0.0, 1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0]),
])
def test_quantize_dequantize_error_within_the_format_bound(fmt, grid):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1000, generator=g) * torch.logspace(-3, 1, 1000)  # wide dynamic range within blocks
    x[17] = 40.0  # an outlier
    q = BlockQuantizer(format=fmt, block_size=64)
    y = q.compress(x).decompress()
    blocks = torch.cat([x, x.new_zeros(24)]).reshape(-1, 64)
    amax = blocks.abs().amax(dim=1)
    if grid is None:
        bound = amax / 127 / 2  # half an int8 step
    else:
        half_gap = max(b - a for a, b in zip(grid, grid[1:])) / 2  # from the literal grid, not the module's
        bound = amax / grid[-1] * half_gap
    bound = bound.repeat_interleave(64)[:1000]
    assert ((y - x).abs() <= bound * (1 + 1e-6)).all()  # 1e-6: float32 division by the scale
    if grid is not None:  # every representable value survives exactly
        exact = torch.tensor(grid + [-v for v in grid[1:]])
        assert torch.equal(BlockQuantizer(format=fmt, block_size=8 * 2).compress(
            torch.cat([exact, exact.new_zeros(1)])).decompress()[:15], exact)


def test_quantizer_hand_cases_and_wire_bytes():
    # E3M0, block [1, 0.3, -0.7, 0...]: scale 1; 0.3 → 0.25 (nearer than 0.5), −0.7 → −0.5 (midpoint 0.75)
    x = torch.tensor([1.0, 0.3, -0.7] + [0.0] * 5)
    assert BlockQuantizer("fp4_e3m0", 8).compress(x).decompress().tolist() == [1.0, 0.25, -0.5] + [0.0] * 5
    # int8: scale 2/127; 1.0 → round(63.5) = 64 (half to even) → 64·2/127
    y = BlockQuantizer("int8", 8).compress(torch.tensor([2.0, 1.0] + [0.0] * 6)).decompress()
    assert y[1].item() == pytest.approx(64 * 2 / 127)
    assert BlockQuantizer("fp4_e2m1", 256).compress(torch.zeros(1000)).nbytes == 1024 // 2 + 4 * 4
    assert BlockQuantizer("int8", 256).wire_bytes(1000) == 1024 + 16


def test_link_bytes_formulas():
    # float32 ring all-reduce of 1000 entries at W=4: 2·3/4·4000 = 6000 bytes per rank
    assert all_reduce_link_bytes(4000, 4) == 6000
    # fp4, block 256, W=4: chunks of 256 entries = 128 + 4 bytes; 2·(W−1)·132 = 792 bytes per rank
    assert quantized_mean_link_bytes(1000, 4, bits=4, block_size=256) == 792
    assert quantized_mean_link_bytes(1000, 1, bits=4, block_size=256) == 0
    # int8, block 256, W=3: 1000 entries padded to 3·512; chunks of 512 = 512 + 8 bytes; 2·2·520 = 2080
    assert quantized_mean_link_bytes(1000, 3) == 2080


@pytest.mark.parametrize("stop", [12, 13])  # 12: quantized stage one in flight; 13: stage two (or fp32) in flight
@pytest.mark.parametrize("eager,quant", [(False, None), (True, "fp4_e3m0"), (False, "int8")])
def test_resume_with_a_fragment_in_flight_continues_exactly(eager, quant, stop):
    kw = dict(num_fragments=2, sync_every=8, overlap_steps=3, mixing=0.5, eager=eager, quantization=quant,
              block_size=8)
    straight = _run(StreamingDiLoCo(**kw), TwoRankAsync(_other), 30)
    first = StreamingDiLoCo(**kw)
    params = _run(first, TwoRankAsync(_other), stop)  # fragment 0 launched at 12, merged at 15: in flight
    assert first._inflight is not None
    state = first.state_dict()
    resumed = StreamingDiLoCo(**kw)
    resumed.init_state([p.clone() for p in params])
    resumed.load_state_dict(state)
    params = _run(resumed, TwoRankAsync(_other), 30, params=params, start=stop + 1)
    for a, b in zip(straight, params):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs,field", [
    (dict(num_fragments=0), "num_fragments"), (dict(num_fragments=4, sync_every=3), "sync_every"),
    (dict(num_fragments=4, sync_every=8, overlap_steps=2), "overlap_steps"), (dict(mixing=1.5), "mixing"),
    (dict(quantization="fp3"), "quantization"), (dict(lr=0.0), "lr"), (dict(momentum=1.0), "momentum"),
    (dict(partition="random"), "partition"),
])
def test_bad_hyperparameters_fail_at_construction(kwargs, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        StreamingDiLoCo(**kwargs)


@pytest.mark.parametrize("kwargs,field", [(dict(format="fp8"), "format"), (dict(block_size=7), "block_size")])
def test_bad_quantizer_arguments(kwargs, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        BlockQuantizer(**kwargs)
