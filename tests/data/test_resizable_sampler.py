"""ResizableBatchSampler: resizing through the controller, resumable position, DistributedSampler as inner sampler."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler, TensorDataset

from lightning_convergence.data.resizable import BatchSizeController, EpochShuffleSampler, ResizableBatchSampler


def test_batch_size_is_read_at_every_batch():
    controller = BatchSizeController(3)
    sampler = ResizableBatchSampler(SequentialSampler(range(20)), 3, False, controller)
    out = []
    for batch in sampler:
        out.append(batch)
        if len(out) == 2:
            controller.set_batch_size(5)
    assert [len(b) for b in out] == [3, 3, 5, 5, 4]
    assert sum(out, []) == list(range(20))
    assert controller.exhausted and controller.yielded == 20


def test_len_and_drop_last():
    controller = BatchSizeController(6)
    keep = ResizableBatchSampler(SequentialSampler(range(20)), 6, False, controller)
    drop = ResizableBatchSampler(SequentialSampler(range(20)), 6, True, controller)
    assert len(keep) == 4 and len(drop) == 3
    assert [len(b) for b in drop] == [6, 6, 6]
    controller.set_batch_size(10)
    assert len(keep) == 2  # the length follows the controller


def test_controller_wins_over_init_batch_size():
    """A re-instantiated sampler (Lightning under DDP) keeps the controller's current size, not its saved arg."""
    controller = BatchSizeController(4)
    controller.set_batch_size(8)
    again = ResizableBatchSampler(SequentialSampler(range(16)), 4, False, controller)
    assert [len(b) for b in again] == [8, 8]


def _consume(sampler: ResizableBatchSampler, n_batches: int) -> list[list[int]]:
    it = iter(sampler)
    taken = []
    for _ in range(n_batches):
        batch = next(it)
        sampler.controller.consume(len(batch))
        taken.append(batch)
    next(it)  # a prefetched batch that training never consumed: it must be replayed after the resume
    return taken


def test_mid_epoch_resume_skips_consumed_indices_and_keeps_the_epoch_order():
    data = range(30)
    ref_ctrl = BatchSizeController(4)
    ref_ctrl.epoch = 2
    reference = list(ResizableBatchSampler(EpochShuffleSampler(data, seed=7), 4, False, ref_ctrl))

    ctrl = BatchSizeController(4)
    ctrl.epoch = 2
    first = _consume(ResizableBatchSampler(EpochShuffleSampler(data, seed=7), 4, False, ctrl), 3)
    state = ctrl.state_dict()
    assert state == {"version": 1, "batch_size": 4, "epoch": 2, "consumed": 12}

    fresh = BatchSizeController(1)
    fresh.load_state_dict(state)
    rest = list(ResizableBatchSampler(EpochShuffleSampler(data, seed=7), 1, False, fresh))
    assert first + rest == reference
    assert fresh.batch_size == 4


def test_a_position_saved_in_an_epoch_the_trainer_ended_early_is_dropped_at_the_next_epoch():
    """Issue #21: ``limit_train_batches`` ends epoch 0 after 2 of its 5 batches; the checkpoint holds (epoch 0, 8
    consumed). Resumed in epoch 1, the sampler must start epoch 1 at its first index, not skip 8 of them; resumed in
    epoch 0 itself (a mid-epoch checkpoint) it still skips them."""
    data = range(20)
    saved = {"version": 1, "batch_size": 4, "epoch": 0, "consumed": 8}

    next_epoch = BatchSizeController(1)
    next_epoch.load_state_dict(saved)
    next_epoch.start_epoch(1)
    batches = list(ResizableBatchSampler(SequentialSampler(data), 4, False, next_epoch))
    assert batches[0] == [0, 1, 2, 3] and len(batches) == 5 and next_epoch.epoch == 1

    same_epoch = BatchSizeController(1)
    same_epoch.load_state_dict(saved)
    same_epoch.start_epoch(0)
    batches = list(ResizableBatchSampler(SequentialSampler(data), 4, False, same_epoch))
    assert batches[0] == [8, 9, 10, 11] and len(batches) == 3


def test_resume_after_a_fully_consumed_epoch_starts_the_next_one():
    ctrl = BatchSizeController(5)
    ctrl.epoch = 0
    for batch in ResizableBatchSampler(SequentialSampler(range(10)), 5, False, ctrl):
        ctrl.consume(len(batch))
    assert ctrl.state_dict()["epoch"] == 1 and ctrl.state_dict()["consumed"] == 0


def test_epoch_shuffle_sampler_is_a_function_of_seed_and_epoch():
    a, b = EpochShuffleSampler(range(50), seed=1), EpochShuffleSampler(range(50), seed=1)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first and sorted(a) == list(range(50))


def test_distributed_inner_sampler_shards_and_resumes_per_rank():
    ds = TensorDataset(torch.arange(32))
    seen = []
    for rank in range(2):
        ctrl = BatchSizeController(4)
        ctrl.epoch = 3
        inner = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=5)
        loader = DataLoader(ds, batch_sampler=ResizableBatchSampler(inner, 4, False, ctrl))
        seen.append(torch.cat([b[0] for b in loader]).tolist())
        # The controller set the DistributedSampler's epoch before iterating.
        assert inner.epoch == 3
    assert set(seen[0]).isdisjoint(seen[1]) and sorted(seen[0] + seen[1]) == list(range(32))


def test_errors():
    with pytest.raises(ValueError, match="`batch_size`"):
        BatchSizeController(0)
    with pytest.raises(TypeError, match="`batch_size`"):  # a float is a wrong type (lightning_convergence._checks)
        ResizableBatchSampler(SequentialSampler(range(4)), 2.5, False)
    with pytest.raises(ValueError, match="`batch_size`"):
        BatchSizeController(2).set_batch_size(-1)
    with pytest.raises(RuntimeError, match="`version`"):
        BatchSizeController(2).load_state_dict({"version": 99})


@pytest.mark.parametrize(("n", "drop_last"), [(12, False), (14, True)])
def test_epoch_counts_as_finished_when_a_loader_stops_after_len_batches(n, drop_last):
    """Lightning's CombinedLoader stops after len() batches without exhausting the sampler's generator."""
    ctrl = BatchSizeController(4)
    ctrl.epoch = 5
    sampler = ResizableBatchSampler(SequentialSampler(range(n)), 4, drop_last, ctrl)
    it = iter(sampler)
    for _ in range(len(sampler)):
        ctrl.consume(len(next(it)))
    assert not ctrl.exhausted
    assert ctrl.state_dict()["epoch"] == 6 and ctrl.state_dict()["consumed"] == 0


class _SelfResumingSampler(SequentialSampler):
    """An inner sampler that checkpoints its own position (as GroupBudgetSampler does): it starts at `start`."""

    restores_position = True

    def __init__(self, data, start: int) -> None:
        super().__init__(data)
        self.start = start

    def __iter__(self):
        return iter(range(self.start, len(self.data_source)))

    def __len__(self) -> int:
        return len(self.data_source) - self.start


def test_inner_sampler_that_restores_its_own_position_is_not_skipped_twice():
    ctrl = BatchSizeController(4)
    ctrl.load_state_dict({"version": 1, "batch_size": 4, "epoch": 0, "consumed": 8})
    batches = list(ResizableBatchSampler(_SelfResumingSampler(range(20), start=8), 4, False, ctrl))
    # The inner sampler already resumed at index 8; skipping the 8 consumed indices again would start at 16.
    assert batches[0] == [8, 9, 10, 11] and sum(batches, []) == list(range(8, 20))
