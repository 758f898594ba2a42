"""``GroupBudgetSampler``: draws each window's indices by a per-group budget, sharded across ranks.

Torch only (no ``lightning`` import). It subclasses ``torch.utils.data.DistributedSampler`` so that Lightning leaves it
in place under DDP instead of injecting its own sampler, and it shards itself.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler

from lightning_convergence._checks import argument_error
from lightning_convergence.sampling.allocation import allocate_budget
from lightning_convergence.sampling.weights import importance_weights

__all__ = ["GroupBudgetSampler"]

_MASK63 = (1 << 63) - 1


def _window_seed(seed: int, epoch: int, window: int) -> int:
    """A 63-bit seed from ``(seed, epoch, window)`` (splitmix64-style mixing, deterministic across processes)."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + window * 0x94D049BB133111EB) & ((1 << 64) - 1)
    x ^= x >> 31
    x = (x * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    x ^= x >> 29
    return x & _MASK63


class GroupBudgetSampler(DistributedSampler):
    """Index sampler that draws every window of ``window_size`` indices with exactly ``counts[i]`` from group ``i``.

    Each window is drawn with a fresh ``torch.Generator`` seeded from ``(seed, epoch, window)``: inside group ``i``,
    ``counts[i]`` members are taken without replacement (concatenated random permutations when ``counts[i]`` exceeds
    the group's size), the window is shuffled, and rank ``r`` of ``R`` takes positions ``r, r+R, …`` — so the ranks'
    shares are disjoint and every position is from group ``i`` with probability ``counts[i]/window_size``. An
    allocation set with :meth:`set_allocation` applies from the next window not yet drawn (windows drawn ahead by a
    prefetching loader keep the allocation they were drawn with, and so do their importance weights).

    Importance weights ``w = (N_i/N) / (n_i/n)`` (see :mod:`~lightning_convergence.sampling.weights`) are queued in
    draw order for each yielded index; the training side takes them with :meth:`pop_weights` as batches are consumed,
    which also advances the resume position.

    Paper: the sampling scheme serves GVM-RAFT (Yao et al., arXiv:2505.02391) and Neyman allocation; see
    :mod:`~lightning_convergence.sampling.allocation`.

    Deviations: an epoch is ``ceil(epoch_size / window_size)`` whole windows, so it may hold up to
    ``window_size − 1`` more draws than the dataset; with a non-uniform allocation some examples repeat in an epoch and
    others are skipped (the budget is what is fixed, not the coverage).

    Args:
        dataset: the map-style dataset (only its length is used).
        group_ids: group of every example, ``len(dataset)`` ints in ``[0, num_groups)``.
        num_groups: K; default ``max(group_ids) + 1``.
        window_size: global draws per window (all ranks), a multiple of ``num_replicas``. Default: the epoch size
            rounded up to a multiple of ``num_replicas`` (one window per epoch). Smaller windows let a new allocation
            take effect sooner.
        epoch_size: global draws per epoch before rounding up to whole windows. Default ``len(dataset)``.
        counts: the initial allocation (``num_groups`` ints summing to ``window_size``). Default: proportional to the
            group sizes (uniform sampling) with at least one draw per non-empty group.
        num_replicas: ranks; default the process group's world size, or 1 without one.
        rank: this rank; default the process group's rank, or 0.
        seed: base seed of the draws, same on every rank. Default ``0``.

    State: ``epoch``, ``consumed`` (indices handed to training this epoch on this rank), the allocation of every
    window drawn this epoch, the pending allocation and its ``allocation_version``, plus the settings it checks on
    load, and ``version``. The generator state is a function of ``(seed, epoch, window)``, all saved.

    Raises:
        ValueError: for group ids out of range or not one per example, ``window_size`` not a positive multiple of
            ``num_replicas``, or an allocation of the wrong length, sign or sum.

    Example::

        sampler = GroupBudgetSampler(ds, group_ids=labels, window_size=256, seed=0)
        sampler.set_allocation(allocate_budget("gvm", 256, sampler.group_sizes, grad_norms=g, min_per_group=1))
        loader = DataLoader(ds, batch_size=32, sampler=sampler)
    """

    STATE_VERSION = 1
    #: Handshake for wrapping batch samplers (e.g. a resizable one): after ``load_state_dict`` this sampler itself
    #: resumes at the consumed position, so a wrapper must not skip indices again.
    restores_position = True

    def __init__(
        self,
        dataset: Dataset,
        group_ids: Sequence[int] | Tensor,
        num_groups: int | None = None,
        window_size: int | None = None,
        epoch_size: int | None = None,
        counts: Sequence[int] | Tensor | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int = 0,
    ) -> None:
        initialized = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if initialized else 1
        if rank is None:
            rank = dist.get_rank() if initialized else 0
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        groups = torch.as_tensor(group_ids, dtype=torch.long).flatten().cpu()
        n = len(dataset)  # type: ignore[arg-type]
        if groups.numel() != n:
            raise ValueError(
                f"GroupBudgetSampler: `group_ids` must have one entry per example ({n}), got {groups.numel()}."
            )
        k = int(num_groups) if num_groups is not None else int(groups.max()) + 1
        if groups.numel() and (groups.min() < 0 or groups.max() >= k):
            raise ValueError(
                f"GroupBudgetSampler: `group_ids` must lie in [0, {k}), got [{int(groups.min())}, {int(groups.max())}]."
            )
        self.group_ids = groups
        self.num_groups = k
        self.group_sizes = torch.bincount(groups, minlength=k)
        self._members = [torch.nonzero(groups == g).flatten() for g in range(k)]
        epoch_size = n if epoch_size is None else int(epoch_size)
        if epoch_size < 1:
            raise argument_error("GroupBudgetSampler", "epoch_size", "None or an int >= 1", epoch_size)
        if window_size is None:
            window_size = math.ceil(epoch_size / self.num_replicas) * self.num_replicas
        if int(window_size) != window_size or window_size < 1 or window_size % self.num_replicas:
            raise argument_error("GroupBudgetSampler", "window_size",
                                 f"a positive multiple of `num_replicas` ({self.num_replicas})", window_size)
        self.window_size = int(window_size)
        self.num_windows = math.ceil(epoch_size / self.window_size)
        self.total_size = self.num_windows * self.window_size
        self.num_samples = self.total_size // self.num_replicas
        self.allocation_version = 0
        if counts is None:
            counts = allocate_budget("uniform", self.window_size, self.group_sizes, min_per_group=1)
        self._counts = self._check_counts(counts)
        self._window_counts: list[Tensor] = []
        self._consumed = 0
        self._start = 0
        self._queue: list[tuple[Tensor, Tensor]] = []
        self._queue_pos = 0

    # -- allocation ---------------------------------------------------------------------------------------------
    def _check_counts(self, counts: Sequence[int] | Tensor) -> Tensor:
        c = torch.as_tensor(counts).flatten()
        if c.is_floating_point():
            if not torch.equal(c, c.round()):
                raise ValueError(f"GroupBudgetSampler: allocation `counts` must be integers, got {c.tolist()}.")
        c = c.long()
        if c.numel() != self.num_groups or (c < 0).any() or int(c.sum()) != self.window_size:
            raise ValueError(
                f"GroupBudgetSampler: allocation `counts` must be {self.num_groups} ints >= 0 summing to "
                f"`window_size` = {self.window_size}, got {c.tolist()}."
            )
        importance_weights(self.group_sizes, c)  # raises if a non-empty group would never be drawn
        return c

    def set_allocation(self, counts: Sequence[int] | Tensor) -> None:
        """Use ``counts`` (``num_groups`` ints summing to ``window_size``) for every window drawn from now on."""
        self._counts = self._check_counts(counts)
        self.allocation_version += 1

    @property
    def counts(self) -> Tensor:
        """The allocation that the next window drawn will use."""
        return self._counts.clone()

    # -- drawing ------------------------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._window_counts = []
            self._consumed = 0
            self._start = 0
        super().set_epoch(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def draw_window(self, window: int, counts: Tensor) -> tuple[Tensor, Tensor]:
        """All ranks' indices of one window (shuffled) and their groups, deterministically from
        ``(seed, epoch, window, counts)``."""
        gen = torch.Generator().manual_seed(_window_seed(self.seed, self.epoch, window))
        idx_parts, grp_parts = [], []
        for g, c in enumerate(counts.tolist()):
            if c == 0:
                continue
            members = self._members[g]
            reps = math.ceil(c / members.numel())
            perm = torch.cat([torch.randperm(members.numel(), generator=gen) for _ in range(reps)])[:c]
            idx_parts.append(members[perm])
            grp_parts.append(torch.full((c,), g, dtype=torch.long))
        idx, grp = torch.cat(idx_parts), torch.cat(grp_parts)
        order = torch.randperm(idx.numel(), generator=gen)
        return idx[order], grp[order]

    def probe_indices(self, per_group: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """A stratified probe: up to ``per_group`` distinct examples of every non-empty group (without replacement,
        drawn from ``generator``, so identical on every rank given the same seed), and their group ids."""
        idx, grp = [], []
        for g, members in enumerate(self._members):
            if members.numel():
                take = members[torch.randperm(members.numel(), generator=generator)[:per_group]]
                idx.append(take)
                grp.append(torch.full((take.numel(),), g, dtype=torch.long))
        return torch.cat(idx), torch.cat(grp)

    def __iter__(self) -> Iterator[int]:
        start, self._start = self._start, 0
        self._consumed = start
        self._queue, self._queue_pos = [], 0
        per_rank = self.window_size // self.num_replicas
        for w in range(start // per_rank, self.num_windows):
            if w >= len(self._window_counts):
                self._window_counts.append(self._counts.clone())
            counts = self._window_counts[w]
            idx, grp = self.draw_window(w, counts)
            idx, grp = idx[self.rank :: self.num_replicas], grp[self.rank :: self.num_replicas]
            offset = start - w * per_rank if w == start // per_rank else 0
            idx, grp = idx[offset:], grp[offset:]
            self._queue.append((importance_weights(self.group_sizes, counts).float()[grp], grp))
            yield from idx.tolist()

    def pop_weights(self, n: int) -> Tensor:
        """Importance weights of the next ``n`` indices handed to training (in draw order); advances ``consumed``.

        Raises:
            RuntimeError: if fewer than ``n`` indices have been drawn but not yet popped (the loader and the
                consumer disagree on the order of samples).
        """
        return self.pop(n)[0]

    def pop(self, n: int) -> tuple[Tensor, Tensor]:
        """Like :meth:`pop_weights`, returning ``(weights, group_ids)`` of the next ``n`` indices."""
        if self._queue and self._queue_pos + n < self._queue[0][0].numel():
            # Fast path (nearly every batch): the batch lies inside one window; views, no concatenation.
            w_all, g_all = self._queue[0]
            start, self._queue_pos = self._queue_pos, self._queue_pos + n
            self._consumed += n
            return w_all[start : start + n], g_all[start : start + n]
        weights: list[Tensor] = []
        groups: list[Tensor] = []
        need = n
        while need > 0:
            if not self._queue:
                raise RuntimeError(
                    f"GroupBudgetSampler: asked for {n} weights but only {n - need} drawn indices are pending; "
                    "was the batch drawn by this sampler?"
                )
            w_all, g_all = self._queue[0]
            take = min(need, w_all.numel() - self._queue_pos)
            weights.append(w_all[self._queue_pos : self._queue_pos + take])
            groups.append(g_all[self._queue_pos : self._queue_pos + take])
            need -= take
            self._queue_pos += take
            if self._queue_pos >= w_all.numel():
                self._queue.pop(0)
                self._queue_pos = 0
        self._consumed += n
        if not weights:
            return torch.zeros(0), torch.zeros(0, dtype=torch.long)
        return torch.cat(weights), torch.cat(groups)

    # -- state --------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        wc = torch.stack(self._window_counts) if self._window_counts else torch.zeros(0, self.num_groups).long()
        return {
            "version": self.STATE_VERSION,
            "epoch": self.epoch,
            "consumed": self._consumed,
            "window_counts": wc,
            "counts": self._counts.clone(),
            "allocation_version": self.allocation_version,
            "seed": self.seed,
            "window_size": self.window_size,
            "num_replicas": self.num_replicas,
            "num_groups": self.num_groups,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position: the next ``__iter__`` resumes at ``consumed`` with the same draws and weights.

        Raises:
            RuntimeError: on another state ``version``.
            ValueError: if ``seed``, ``window_size``, ``num_replicas`` or ``num_groups`` differ from the checkpoint's
                (the draws could not be replayed).
        """
        if state.get("version") != self.STATE_VERSION:
            raise RuntimeError(
                f"GroupBudgetSampler: state `version` {state.get('version')!r} is not {self.STATE_VERSION}."
            )
        for key in ("seed", "window_size", "num_replicas", "num_groups"):
            if int(state[key]) != int(getattr(self, key)):
                raise ValueError(
                    f"GroupBudgetSampler: `{key}` is {getattr(self, key)} but the checkpoint was drawn with "
                    f"{state[key]}; the draws cannot be replayed."
                )
        self.epoch = int(state["epoch"])
        self._consumed = self._start = int(state["consumed"])
        self._window_counts = [c.long().clone() for c in state["window_counts"]]
        self._counts = state["counts"].long().clone()
        self.allocation_version = int(state["allocation_version"])
