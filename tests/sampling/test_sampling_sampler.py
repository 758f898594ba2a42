"""GroupBudgetSampler: exact per-window budgets, disjoint rank shares (in-process and real gloo ranks), identical
resume, and validation."""

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_convergence.sampling import GroupBudgetSampler
from tests.helpers.dist import run_processes

GROUPS = torch.tensor([0] * 20 + [1] * 8 + [2] * 4)
DS = TensorDataset(torch.arange(32))


def test_each_window_holds_exactly_the_allocation():
    s = GroupBudgetSampler(DS, GROUPS, window_size=12, counts=[2, 6, 4], seed=3)
    assert isinstance(s, DistributedSampler)
    assert len(s) == 36  # ceil(32/12) = 3 windows
    idx = torch.tensor(list(s))
    for w in range(3):
        window = idx[12 * w : 12 * (w + 1)]
        assert torch.bincount(GROUPS[window], minlength=3).tolist() == [2, 6, 4]
        assert window.unique().numel() == 12  # no repeats inside a window when n_i <= N_i
    assert s.pop_weights(36).tolist() == pytest.approx(
        [{0: (20 / 32) / (2 / 12), 1: (8 / 32) / (6 / 12), 2: (4 / 32) / (4 / 12)}[int(g)] for g in GROUPS[idx]]
    )


def test_two_ranks_take_disjoint_shares_of_the_same_window():
    shares = []
    for rank in range(2):
        s = GroupBudgetSampler(DS, GROUPS, window_size=16, counts=[6, 6, 4], num_replicas=2, rank=rank, seed=7)
        s.set_epoch(2)
        shares.append(torch.tensor(list(s)))
    one = GroupBudgetSampler(DS, GROUPS, window_size=16, counts=[6, 6, 4], num_replicas=1, rank=0, seed=7)
    one.set_epoch(2)
    assert len(shares[0]) == len(shares[1]) == 16
    for w in range(2):
        a, b = shares[0][8 * w : 8 * w + 8], shares[1][8 * w : 8 * w + 8]
        assert set(a.tolist()).isdisjoint(b.tolist())
        window, _ = one.draw_window(w, torch.tensor([6, 6, 4]))
        assert sorted(a.tolist() + b.tolist()) == sorted(window.tolist())


def _rank_draw(rank, world_size):
    s = GroupBudgetSampler(DS, GROUPS, window_size=16, counts=[6, 6, 4], seed=11)  # rank/world from the group
    s.set_epoch(1)
    return s.rank, s.num_replicas, list(s)


def test_two_gloo_ranks_draw_disjoint_samples():
    (r0, w0, a), (r1, w1, b) = run_processes(_rank_draw, 2)
    assert (r0, r1, w0, w1) == (0, 1, 2, 2)
    for w in range(2):  # per window (indices may recur across windows, never across ranks within one)
        assert set(a[8 * w : 8 * w + 8]).isdisjoint(b[8 * w : 8 * w + 8])


def test_resume_mid_epoch_is_identical_including_a_reallocation():
    def make():
        return GroupBudgetSampler(DS, GROUPS, window_size=8, counts=[4, 2, 2], num_replicas=2, rank=1, seed=5)

    straight = make()
    straight.set_epoch(3)
    it = iter(straight)
    head = [next(it) for _ in range(6)]  # rank share per window = 4: into window 1
    head_w = straight.pop_weights(5)  # training consumed 5 of the 6 drawn (prefetch of one)
    straight.set_allocation([2, 2, 4])  # applies from window 2 (windows 0 and 1 already drawn)
    state = straight.state_dict()
    tail = list(it)
    tail_w = straight.pop_weights(len(tail) + 1)

    resumed = make()
    resumed.load_state_dict(state)
    resumed.set_epoch(3)  # Lightning calls this again on restart: same epoch, position kept
    again = list(resumed)
    assert again == head[5:] + tail
    torch.testing.assert_close(resumed.pop_weights(len(again)), tail_w)
    assert len(head_w) == 5 and resumed.state_dict()["allocation_version"] == 1
    # The reallocation did apply to later windows.
    assert torch.equal(state["window_counts"][-1], torch.tensor([4, 2, 2]))
    assert torch.equal(resumed.state_dict()["window_counts"][2], torch.tensor([2, 2, 4]))
    # A new epoch starts from the beginning with the current allocation.
    resumed.set_epoch(4)
    assert len(list(resumed)) == len(resumed)


def test_dataloader_batches_follow_the_sampler_and_weights_pop_in_order():
    s = GroupBudgetSampler(DS, GROUPS, window_size=8, counts=[2, 2, 4], seed=0)
    loader = DataLoader(DS, batch_size=3, sampler=s)
    seen, weights = [], []
    for (batch,) in loader:
        seen += batch.tolist()
        weights.append(s.pop_weights(len(batch)))
    assert seen == list(s)
    torch.testing.assert_close(torch.cat(weights), s.pop_weights(len(seen)))
    with pytest.raises(RuntimeError, match="pending"):
        s.pop_weights(1)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"group_ids": GROUPS[:5]}, "group_ids"),
        ({"group_ids": GROUPS, "num_groups": 2}, "group_ids"),
        ({"group_ids": GROUPS, "window_size": 7, "num_replicas": 2, "rank": 0}, "window_size"),
        ({"group_ids": GROUPS, "window_size": 8, "counts": [4, 4, 1]}, "counts"),
        ({"group_ids": GROUPS, "window_size": 8, "counts": [4, 4, 0]}, "no draws"),
    ],
)
def test_sampler_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        GroupBudgetSampler(DS, **kwargs)


def test_load_refuses_other_settings():
    a = GroupBudgetSampler(DS, GROUPS, window_size=8, seed=0)
    b = GroupBudgetSampler(DS, GROUPS, window_size=16, seed=0)
    with pytest.raises(ValueError, match="window_size"):
        b.load_state_dict(a.state_dict())
