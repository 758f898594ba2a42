"""Hand-computed cases for the local-SGD cores with a fake communicator (torchft's trick: a scripted other rank)."""

from __future__ import annotations

import pytest
import torch

from lightning_convergence.averaging import (
    CO2,
    Communicator,
    DiLoCo,
    NoLoCo,
    PeriodicAveraging,
    flatten,
)
from lightning_convergence.comm.links import all_gather_link_bytes, all_reduce_link_bytes


class TwoRankFake(Communicator):
    """Rank 0 of a pretend 2-rank group whose other rank holds ``other`` (a callable of the input, or a tensor).

    It counts link bytes as a real communicator would (ring all-reduce, all-gather, point-to-point at W=2)."""

    def __init__(self, other) -> None:
        self.rank, self.world_size = 0, 2
        self.other = other
        self.exchanged: list[int] = []

    def _other(self, t):
        return self.other(t) if callable(self.other) else self.other

    def all_reduce_mean_(self, tensor):
        self.link_bytes_total += all_reduce_link_bytes(tensor.numel() * tensor.element_size(), 2)
        tensor.copy_((tensor + self._other(tensor)) / 2)

    def all_reduce_mean_async(self, tensor):
        fake = self

        class _Pending:
            done = False

            def wait(self):
                if not self.done:
                    fake.all_reduce_mean_(tensor)
                    self.done = True
                return tensor

        return _Pending()

    def all_gather(self, tensor):
        self.link_bytes_total += all_gather_link_bytes(tensor.numel() * tensor.element_size(), 2)
        return [tensor.clone(), self._other(tensor).clone()]

    def exchange(self, tensor, peer):
        self.link_bytes_total += tensor.numel() * tensor.element_size()
        self.exchanged.append(peer)
        return self._other(tensor).clone()


def _params(*values):
    return [torch.tensor(v, dtype=torch.float32) for v in values]


def test_averaging_diloco_outer_step_matches_hand_computation():
    params = _params([0.5, 1.0])
    outer = DiLoCo(lr=0.7, momentum=0.9)
    outer.init_state(_params([1.0, 2.0]))
    # round 1: Δ_0 = [0.5, 1.0], Δ_1 = [0.3, 0.6] (other rank at [0.7, 1.4]) → mean Δ = [0.4, 0.8]
    # b = Δ; d = Δ + 0.9 b = 1.9 Δ = [0.76, 1.52]; θ = [1, 2] − 0.7 d = [0.468, 0.936]
    stats = outer.sync(params, TwoRankFake(torch.tensor([0.3, 0.6])), step=3)
    torch.testing.assert_close(params[0], torch.tensor([0.468, 0.936]))
    assert stats.bytes_sent == 8  # ring all-reduce of 2 float32 at W=2: 2·(W−1)/W·8 bytes per rank
    torch.testing.assert_close(stats.pseudo_grad_sq, torch.tensor(0.4**2 + 0.8**2))
    torch.testing.assert_close(stats.divergence_sq, torch.tensor(0.1**2 + 0.2**2))  # ||θ_0 − θ̄||²
    # round 2: mean Δ = [0.1, −0.2]; b = 0.9·[0.4, 0.8] + Δ = [0.46, 0.52]; d = Δ + 0.9 b = [0.514, 0.268]
    params[0].copy_(torch.tensor([0.368, 1.136]))
    outer.sync(params, TwoRankFake(torch.tensor([0.1, -0.2])), step=6)
    torch.testing.assert_close(params[0], torch.tensor([0.468 - 0.7 * 0.514, 0.936 - 0.7 * 0.268]))


def test_averaging_diloco_identity_compressor_equals_uncompressed():
    from lightning_convergence.compress import Identity

    a, b = DiLoCo(), DiLoCo(compressor=Identity())
    pa, pb = _params([0.5, 1.0]), _params([0.5, 1.0])
    a.init_state(_params([1.0, 2.0]))
    b.init_state(_params([1.0, 2.0]))
    sa = a.sync(pa, TwoRankFake(torch.tensor([0.3, 0.6])), step=1)
    sb = b.sync(pb, TwoRankFake(torch.tensor([0.3, 0.6])), step=1)
    torch.testing.assert_close(pa[0], pb[0])
    assert sa.bytes_sent == sb.bytes_sent


def test_averaging_diloco_topk_error_feedback_carries_the_dropped_part():
    from lightning_convergence.compress import TopK

    outer = DiLoCo(lr=1.0, momentum=0.0, compressor=TopK(k_fraction=0.5))
    params = _params([0.0, 0.0, 0.0, 0.0])
    outer.init_state(_params([4.0, 3.0, 2.0, 1.0]))  # own δ = [4, 3, 2, 1]; Top-2 keeps [4, 3, 0, 0]
    from lightning_convergence.comm import payload_bytes as _to_bytes

    # the other rank's δ = [0, 0, 2, 2]: its Top-2 payload arrives as bytes through the all-gather
    other_blob = _to_bytes([TopK(k_fraction=0.5).compress(torch.tensor([0.0, 0.0, 2.0, 2.0]), 1, "diloco")])
    stats = outer.sync(params, TwoRankFake(other_blob), step=1)
    torch.testing.assert_close(outer.residual, torch.tensor([0.0, 0.0, 2.0, 1.0]))  # δ − C(δ)
    # mean of decompressed payloads = ([4, 3, 0, 0] + [0, 0, 2, 2]) / 2; lr 1, μ 0: θ = anchor − mean
    torch.testing.assert_close(params[0], torch.tensor([2.0, 1.5, 1.0, 0.0]))
    assert stats.bytes_sent == 2 * 4 + 2 * 4  # all-gather at W=2: this rank sends its 2 values + 2 int32 indices once


def test_averaging_diloco_equals_torch_nesterov_sgd_on_pseudo_gradient():
    gen = torch.Generator().manual_seed(0)
    anchor = torch.randn(5, generator=gen)
    ref = torch.nn.Parameter(anchor.clone())
    opt = torch.optim.SGD([ref], lr=0.7, momentum=0.9, nesterov=True)
    outer = DiLoCo(lr=0.7, momentum=0.9)
    outer.init_state([anchor.clone()])
    for step in range(5):
        local = [outer.anchor - torch.randn(5, generator=gen) * 0.1]
        other = outer.anchor - torch.randn(5, generator=gen) * 0.1
        mean_delta = ((outer.anchor - local[0]) + (outer.anchor - other)) / 2
        ref.grad = mean_delta.clone()
        opt.step()
        other_delta = outer.anchor - other
        outer.sync(local, TwoRankFake(other_delta), step)
        torch.testing.assert_close(local[0], ref.detach(), atol=1e-6, rtol=0)  # float32 op order only


def test_averaging_periodic_replaces_by_mean_and_drops_nonfinite_round():
    params = _params([1.0, 3.0], [2.0])
    outer = PeriodicAveraging()
    outer.init_state(_params([0.0, 0.0], [0.0]))
    stats = outer.sync(params, TwoRankFake(torch.tensor([3.0, 1.0, 4.0])), step=1)
    assert [p.tolist() for p in params] == [[2.0, 2.0], [3.0]]
    assert stats.pseudo_grad_sq.item() == pytest.approx(17.0) and not stats.skipped
    params[0].copy_(torch.tensor([5.0, 5.0]))
    stats = outer.sync(params, TwoRankFake(torch.tensor([float("nan"), 0.0, 0.0])), step=2)
    assert stats.skipped and [p.tolist() for p in params] == [[2.0, 2.0], [3.0]]  # back to the last good mean


def test_averaging_noloco_hand_computed_with_separate_consensus_lr():
    theta = _params([2.0, 0.0])
    outer = NoLoCo(lr=0.5, momentum=0.5, consensus_lr=0.25)
    outer.init_state(_params([1.0, 1.0]))
    outer.phi = torch.tensor([1.0, 1.0])
    # partner: θ_j = [0, 2], φ_j = [3, 1] → meanθ = [1, 1], meanφ = [2, 1]; meanΔ = meanθ − meanφ = [−1, 0]
    comm = TwoRankFake(torch.tensor([0.0, 2.0, 3.0, 1.0]))
    stats = outer.sync(theta, comm, step=0)
    # m = 0.5·(−1, 0) + 0.25·((2, 1) − (1, 1)) = (−0.25, 0); φ = (0.75, 1); θ = φ
    torch.testing.assert_close(theta[0], torch.tensor([0.75, 1.0]))
    torch.testing.assert_close(outer.momentum_buffer, torch.tensor([-0.25, 0.0]))
    assert comm.exchanged == [1] and stats.bytes_sent == 4 * 4  # this rank sends θ and φ (4 floats) to its partner


def test_averaging_noloco_equal_rates_send_only_theta_and_match_official_form():
    theta = _params([2.0, 0.0])
    outer = NoLoCo(lr=0.7, momentum=0.9)
    outer.init_state(_params([1.0, 1.0]))
    outer.momentum_buffer = torch.tensor([0.1, -0.1])
    comm = TwoRankFake(torch.tensor([0.0, 2.0]))
    stats = outer.sync(theta, comm, step=0)
    # official: m = μ m + lr·meanΔ + lr·(meanφ − φ_i) with φ_j = φ_i = [1, 1] → = 0.9 m + 0.7·(meanθ − φ_i)
    expected_m = torch.tensor([0.09, -0.09]) + 0.7 * (torch.tensor([1.0, 1.0]) - torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(outer.momentum_buffer, expected_m)
    torch.testing.assert_close(theta[0], torch.tensor([1.09, 0.91]))
    assert stats.bytes_sent == 2 * 4  # θ only (2 floats) to the partner


def test_averaging_co2_applies_round_mean_one_round_late_with_penalty_and_clip():
    outer = CO2(lr=1.0, momentum=0.5, gap_penalty=2.0, clip=True, clip_threshold=0.3)
    params = _params([0.0, 0.0])
    outer.init_state(params)
    # round 1: own δ = [−1, −0.2] (θ moved to [1, 0.2]); other δ = [−0.6, 0.2] → mean [−0.8, 0]; not applied yet
    params[0].copy_(torch.tensor([1.0, 0.2]))
    outer.sync(params, TwoRankFake(torch.tensor([-0.6, 0.2])), step=1)
    torch.testing.assert_close(outer.anchor, torch.tensor([0.0, 0.0]))  # nothing applied in round 1
    torch.testing.assert_close(params[0], torch.tensor([1.0, 0.2]))  # x − δ = own progress kept
    # round 2: own δ = [0, −0.1]; round 1's mean arrives: m = 0.5·0 + [−0.8, 0]/2 = [−0.4, 0] → clamp → [−0.3, 0]
    params[0].copy_(torch.tensor([1.0, 0.3]))
    outer.sync(params, TwoRankFake(torch.tensor([0.0, 0.1])), step=2)
    torch.testing.assert_close(outer.momentum_buffer, torch.tensor([-0.3, 0.0]))  # clamp_ took effect
    torch.testing.assert_close(outer.anchor, torch.tensor([0.3, 0.0]))
    torch.testing.assert_close(params[0], torch.tensor([0.3, 0.1]))  # x − δ_round2
    # finalize: pending mean of round 2 = [0, 0] → m = 0.5·[−0.3, 0] = [−0.15, 0]; x = [0.45, 0];
    # then the current round (δ = start − θ = 0) averages to 0 → m = [−0.075, 0]; x = [0.525, 0]
    outer.finalize(params, TwoRankFake(torch.tensor([0.0, 0.0])))
    torch.testing.assert_close(params[0], torch.tensor([0.525, 0.0]))


def test_averaging_co2_without_clip_is_released_code_formula():
    outer = CO2(lr=1.0, momentum=0.0, gap_penalty=1.0, clip=False)
    params = _params([0.0])
    outer.init_state(params)
    params[0].fill_(5.0)
    outer.sync(params, TwoRankFake(torch.tensor([-5.0])), step=1)
    outer.sync(params, TwoRankFake(torch.tensor([0.0])), step=2)
    torch.testing.assert_close(outer.anchor, torch.tensor([5.0]))  # full stale mean applied, no clamp at 1.0


@pytest.mark.parametrize("make", [PeriodicAveraging, DiLoCo, NoLoCo, CO2])
def test_averaging_state_dict_round_trip_and_version(make):
    a, b = make(), make()
    p = _params([1.0, 2.0])
    a.init_state(p)
    p[0].add_(1.0)
    a.sync(p, TwoRankFake(torch.tensor([0.0, 0.0] if make is not NoLoCo else [0.5, 0.5])), step=1)
    state = a.state_dict()
    b.load_state_dict(state)
    for k, v in state.items():
        if torch.is_tensor(v):
            assert torch.equal(v, b.state_dict()[k])
    with pytest.raises(RuntimeError, match="`version`"):
        b.load_state_dict({**state, "version": 99})


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: DiLoCo(lr=0), "`lr`"),
        (lambda: DiLoCo(momentum=1.0), "`momentum`"),
        (lambda: NoLoCo(lr=-1), "`lr`"),
        (lambda: NoLoCo(momentum=-0.1), "`momentum`"),
        (lambda: NoLoCo(consensus_lr=-1), "`consensus_lr`"),
        (lambda: CO2(lr=0), "`lr`"),
        (lambda: CO2(momentum=1.5), "`momentum`"),
        (lambda: CO2(gap_penalty=0), "`gap_penalty`"),
        (lambda: CO2(clip_threshold=0), "`clip_threshold`"),
    ],
)
def test_averaging_errors_name_the_field(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_averaging_sync_before_init_raises():
    with pytest.raises(RuntimeError, match="init_state"):
        DiLoCo().sync(_params([1.0]), TwoRankFake(torch.tensor([0.0])), step=1)


def test_averaging_flatten_round_trip():
    ts = _params([1.0, 2.0], [[3.0]])
    assert flatten(ts).tolist() == [1.0, 2.0, 3.0]

