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
