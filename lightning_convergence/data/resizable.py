"""A batch sampler whose batch size can change while a DataLoader iterates, and whose position can be resumed.

Lightning has no public API to change the batch size once ``fit`` has started (Lightning issues #19286, #21448).
:class:`ResizableBatchSampler` reads its batch size from a shared :class:`BatchSizeController` at every batch, so a
callback can resize batches without touching the DataLoader. Under DDP Lightning re-instantiates custom batch
samplers with their saved init arguments and ``sampler=DistributedSampler(...)``; the controller passed at init is
the same object in the new instance, so the controller (not a sampler instance) is the handle to keep.

Resumable position: the controller records the epoch and how many indices training consumed in it (the callback
that owns it reports consumption, because DataLoader prefetching runs the sampler ahead of training). After
``load_state_dict`` the next iteration sets the inner sampler's epoch and skips the consumed indices.

Limits of resuming: the skipped indices are the first ``consumed`` of the inner sampler's order for that epoch, so
the order must be a function of the epoch (``DistributedSampler``, :class:`EpochShuffleSampler`, sequential). A
``RandomSampler`` without a seeded generator draws a new order after a resume; replace it with
:class:`EpochShuffleSampler`. Consumption is counted in indices, so it survives batch-size changes.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import BatchSampler, Sampler

from lightning_convergence._checks import check_int_at_least, check_state_version

__all__ = ["BatchSizeController", "EpochShuffleSampler", "ResizableBatchSampler"]


class BatchSizeController:
    """The mutable state shared by a :class:`ResizableBatchSampler` and whoever resizes it.

    Args:
        batch_size: indices per batch, ≥ 1.

    Attributes:
        batch_size: read by the sampler at every batch.
        epoch: when not ``None``, the sampler calls ``inner_sampler.set_epoch(epoch)`` before iterating, so the
            restored order does not depend on when the trainer sets the epoch (defensive: Lightning 2.6 sets it
            before the first fetch; the value is the same).
        consumed: indices consumed by training in the current epoch (reported by the owner via :meth:`consume`).
        yielded: indices the sampler has handed out in its current iteration (skipped ones included).
        exhausted: whether the current iteration has ended.

    State: ``batch_size``, ``epoch`` and ``consumed`` (normalised to ``(epoch + 1, 0)`` when the epoch was fully
    consumed), plus a ``version`` key.

    Raises:
        ValueError: for a ``batch_size`` < 1.
    """

    STATE_VERSION = 1

    def __init__(self, batch_size: int) -> None:
        self.batch_size = _check_batch_size(batch_size)
        self.epoch: int | None = None
        self.consumed = 0
        self.yielded = 0
        self.exhausted = False
        self.epoch_size: int | None = None
        self.drop_last = False
        self._skip = 0

    def set_batch_size(self, batch_size: int) -> None:
        """Change the batch size; the next batch the sampler forms uses it."""
        self.batch_size = _check_batch_size(batch_size)

    def start_epoch(self, epoch: int) -> None:
        """Training begins ``epoch`` (call it from ``on_train_epoch_start``).

        A restored position belongs to the epoch it was saved in: when training begins a different epoch, that
        epoch was ended by the trainer (``limit_train_batches``, a checkpoint written at the epoch's end) before the
        sampler ran out, and the new epoch starts from its first index.
        """
        epoch = int(epoch)
        if self.epoch is not None and epoch != self.epoch:
            self._skip = 0
        self.epoch = epoch

    def consume(self, n: int) -> None:
        """Record that training took ``n`` more indices of the current epoch."""
        self.consumed += int(n)

    def _begin_iteration(self, epoch_size: int | None, drop_last: bool) -> int:
        skip, self._skip = self._skip, 0
        self.consumed = skip
        self.yielded = skip
        self.exhausted = False
        self.epoch_size, self.drop_last = epoch_size, drop_last
        return skip

    def _epoch_finished(self) -> bool:
        # A loader may stop asking after len() batches (Lightning's CombinedLoader does), so the sampler's own
        # exhaustion is not always seen: compare what training consumed with the epoch's size too.
        if self.exhausted and self.consumed >= self.yielded:
            return True
        if self.epoch_size is None:
            return False
        remaining = self.epoch_size - self.consumed
        return remaining <= 0 or (self.drop_last and remaining < self.batch_size)

    def state_dict(self) -> dict[str, Any]:
        epoch, consumed = self.epoch, self.consumed
        if self._epoch_finished():
            # The epoch's batches were all consumed: resume at the start of the next epoch.
            epoch, consumed = (None if epoch is None else epoch + 1), 0
        return {"version": self.STATE_VERSION, "batch_size": self.batch_size, "epoch": epoch, "consumed": consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_version("BatchSizeController", state, self.STATE_VERSION)
        self.batch_size = _check_batch_size(state["batch_size"])
        self.epoch = None if state["epoch"] is None else int(state["epoch"])
        self._skip = int(state["consumed"])
        self.consumed = self._skip


class ResizableBatchSampler(BatchSampler):
    """A ``BatchSampler`` whose batch size is read from a :class:`BatchSizeController` at every batch.

    It shards nothing itself: under DDP Lightning re-creates it with ``sampler=DistributedSampler(...)``.

    Args:
        sampler: the index sampler (sequential, shuffling, distributed...).
        batch_size: initial batch size, ≥ 1; used to create a controller when ``controller`` is ``None``, and
            ignored otherwise (the controller's value wins, so a re-instantiated sampler keeps the current size).
        drop_last: drop the last incomplete batch of an epoch.
        controller: the shared controller; a new one is created when ``None``.

    Raises:
        ValueError: for a ``batch_size`` < 1.

    Example::

        controller = BatchSizeController(32)
        loader = DataLoader(ds, batch_sampler=ResizableBatchSampler(RandomSampler(ds), 32, False, controller))
        controller.set_batch_size(64)  # the next batch has 64 examples
    """

    def __init__(
        self, sampler: Sampler[int], batch_size: int, drop_last: bool, controller: BatchSizeController | None = None
    ) -> None:
        super().__init__(sampler, _check_batch_size(batch_size), drop_last)
        self.controller = controller if controller is not None else BatchSizeController(batch_size)
        self.batch_size = self.controller.batch_size

    def __iter__(self) -> Iterator[list[int]]:
        c = self.controller
        if c.epoch is not None and callable(getattr(self.sampler, "set_epoch", None)):
            self.sampler.set_epoch(c.epoch)
        skip = c._begin_iteration(_sized_len(self.sampler), self.drop_last)
        if getattr(self.sampler, "restores_position", False):
            # An inner sampler that checkpoints its own position (GroupBudgetSampler) already resumes past the
            # consumed indices: skipping them here too would drop them twice.
            skip = 0
        batch: list[int] = []
        for idx in itertools.islice(iter(self.sampler), skip, None):
            batch.append(idx)
            if len(batch) >= c.batch_size:
                c.yielded += len(batch)
                self.batch_size = c.batch_size
                yield batch
                batch = []
        if batch and not self.drop_last:
            c.yielded += len(batch)
            yield batch
        c.exhausted = True

    def __len__(self) -> int:
        """Batches in a full epoch at the controller's current batch size (what Lightning counts per epoch)."""
        n = len(self.sampler)  # type: ignore[arg-type]
        bs = self.controller.batch_size
        return n // bs if self.drop_last else (n + bs - 1) // bs


class EpochShuffleSampler(Sampler[int]):
    """A random permutation per epoch drawn from ``seed + epoch``: the same order after a resume.

    Args:
        data_source: the dataset (only its length is used).
        seed: base seed of the permutations. Default ``0``.

    State: none beyond ``epoch`` (set by ``set_epoch``, as for ``DistributedSampler``).
    """

    def __init__(self, data_source: Sized, seed: int = 0) -> None:
        self.data_source = data_source
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        yield from torch.randperm(len(self.data_source), generator=g).tolist()

    def __len__(self) -> int:
        return len(self.data_source)


def _sized_len(obj: Any) -> int | None:
    try:
        return len(obj)
    except TypeError:
        return None


def _check_batch_size(batch_size: Any) -> int:
    check_int_at_least("ResizableBatchSampler", "batch_size", batch_size, 1)
    return batch_size
