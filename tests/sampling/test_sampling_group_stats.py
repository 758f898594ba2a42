"""GroupStats against hand-computed per-group norms, variances, EMAs and acceptance rates."""

import math

import pytest
import torch

from lightning_convergence.sampling import GroupStats


def test_hand_computed_group_statistics():
    gs = GroupStats(3, beta=0.0)  # beta 0: the latest measurement exactly
    # Group 0: rows (3,4) and (0,0); group 1: one row (1,0) (no variance from one row); group 2 unseen.
    a = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 0.0]])
    assert gs.update_grads(torch.tensor([0, 1, 0]), [a], group_weights=torch.tensor([0.5, 0.5, 0.0]))
    assert gs.value("grad_norm").tolist() == pytest.approx([2.5, 1.0, 0.0])  # mean of norms 5 and 0
    assert gs.value("grad_sq").tolist() == pytest.approx([12.5, 1.0, 0.0])
    # tr Cov of (3,4),(0,0) with Bessel: (1.5² + 1.5²) + (2² + 2²) = 12.5
    assert gs.value("grad_var").tolist() == pytest.approx([12.5, 0.0, 0.0])
    assert gs.measured("grad_var").tolist() == [True, False, False]
    # ‖0.5·(1.5, 2) + 0.5·(1, 0)‖² = 1.25² + 1² = 2.5625
    assert gs.full_grad_sq == pytest.approx(2.5625)
    assert gs.value("accept_rate", default=1.0).tolist() == [1.0, 1.0, 1.0]


def test_bias_corrected_ema_per_group_and_acceptance():
    gs = GroupStats(2, beta=0.5)
    gs.update_grads(torch.tensor([0]), [torch.tensor([[2.0]])])
    gs.update_grads(torch.tensor([0, 1]), [torch.tensor([[4.0], [6.0]])])
    # group 0: (0.5·0.5·2 + 0.5·4) / (1 − 0.25) = 2.5/0.75; group 1 seen once: exactly 6.
    assert gs.value("grad_norm").tolist() == pytest.approx([2.5 / 0.75, 6.0])
    gs.update_acceptance(torch.tensor([3, 0]), torch.tensor([4, 0]))
    assert gs.value("accept_rate", default=1.0).tolist() == pytest.approx([0.75, 1.0])
    with pytest.raises(ValueError, match="accepted"):
        gs.update_acceptance(torch.tensor([5, 0]), torch.tensor([4, 0]))


def test_nonfinite_probe_is_skipped_and_state_round_trips():
    gs = GroupStats(2, beta=0.9)
    gs.update_grads(torch.tensor([0, 1]), [torch.tensor([[1.0], [2.0]])])
    before = gs.state_dict()
    assert not gs.update_grads(torch.tensor([0, 1]), [torch.tensor([[math.nan], [2.0]])])
    assert gs.nonfinite_skipped_total == 1
    assert gs.value("grad_norm").tolist() == pytest.approx([1.0, 2.0])
    other = GroupStats(2, beta=0.9)
    other.load_state_dict(gs.state_dict())
    assert other.value("grad_norm").tolist() == gs.value("grad_norm").tolist()
    assert other.nonfinite_skipped_total == 1 and before["version"] == 1
    with pytest.raises(ValueError, match="num_groups"):
        GroupStats(3).load_state_dict(gs.state_dict())
    with pytest.raises(ValueError, match="beta"):
        GroupStats(2, beta=1.0)


def test_one_pass_statistics_equal_per_group_reference():
    """The vectorised update equals a per-group computation with stats.sample_grad_stats (random, 2 params)."""
    from lightning_convergence.stats import sample_grad_stats, sq_norm

    gen = torch.Generator().manual_seed(3)
    groups = torch.tensor([2, 0, 2, 2, 0, 4, 0, 2, 4, 1])  # group 3 absent, group 1 has one row
    a, b = torch.randn(10, 3, 2, generator=gen), torch.randn(10, 5, generator=gen) * 4
    share = torch.tensor([0.3, 0.1, 0.4, 0.05, 0.15])
    gs = GroupStats(5, beta=0.0)
    gs.update_grads(groups, [a, b], group_weights=share)
    sq = a.flatten(1).double().pow(2).sum(1) + b.double().pow(2).sum(1)
    full = [torch.zeros(3, 2, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)]
    for g in (0, 1, 2, 4):
        rows = groups == g
        assert gs.value("grad_norm")[g] == pytest.approx(float(sq[rows].sqrt().mean()))
        assert gs.value("grad_sq")[g] == pytest.approx(float(sq[rows].mean()))
        if rows.sum() >= 2:
            assert gs.value("grad_var")[g] == pytest.approx(sample_grad_stats([a[rows], b[rows]]).trace_cov, rel=1e-5)
        full = [f + float(share[g]) * t[rows].double().mean(0) for f, t in zip(full, (a, b))]
    assert gs.measured("grad_var").tolist() == [True, False, True, False, True]
    assert gs.measured("grad_norm").tolist() == [True, True, True, False, True]
    assert gs.full_grad_sq == pytest.approx(float(sq_norm(full)))
