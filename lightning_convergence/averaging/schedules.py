"""Communication schedules for local SGD: when to synchronise, and when to run as plain DDP first.

``step`` is the number of optimizer steps completed (1 after the first step). A schedule is stateless: it derives
everything from ``step``, so resume needs nothing from it. Imports nothing but the standard library.
"""

from __future__ import annotations

import math

from lightning_convergence._checks import check_int_at_least

__all__ = ["SyncSchedule", "FixedPeriod", "IncreasingFrequency", "SingleFinalMerge"]


class SyncSchedule:
    """Base class. ``start_step`` optimizer steps of DDP (gradients all-reduced every step) come first.

    Args:
        start_step: steps of synchronous DDP before the local phase (post-local SGD's warm-up), ≥ 0. Default 0.
    """

    def __init__(self, start_step: int = 0) -> None:
        self.start_step = check_int_at_least(type(self).__name__, "start_step", start_step, 0)

    def in_warmup(self, step: int) -> bool:
        """True while the step about to run (``step + 1``) is a DDP step (``step`` = steps completed)."""
        return step < self.start_step

    def should_sync(self, step: int) -> bool:
        """True when the replicas synchronise right after optimizer step ``step`` (1-based)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class FixedPeriod(SyncSchedule):
    """Synchronise every ``period`` steps of the local phase (local SGD; post-local SGD with ``start_step`` > 0).

    Paper: Lin, Stich, Patel, Jaggi. *Don't Use Large Mini-Batches, Use Local SGD.* ICLR 2020, arXiv:1808.07217.

    Args:
        period: H, local steps between synchronisations, ≥ 1. ``1`` averages after every step (equals DDP for SGD).
            DiLoCo used 500, NoLoCo 50; on a slow link start at 32 and raise while the loss gap stays small.
        start_step: DDP steps before the local phase, ≥ 0. Default 0.

    Raises:
        TypeError / ValueError: if ``period`` is not an int ≥ 1 or ``start_step`` not an int ≥ 0.

    Example:
        >>> [s for s in range(1, 10) if FixedPeriod(period=4, start_step=2).should_sync(s)]
        [6]
    """

    def __init__(self, period: int = 8, start_step: int = 0) -> None:
        super().__init__(start_step)
        self.period = check_int_at_least("FixedPeriod", "period", period, 1)

    def should_sync(self, step: int) -> bool:
        local = step - self.start_step
        return local > 0 and local % self.period == 0


class IncreasingFrequency(SyncSchedule):
    """Communicate more towards the end: the period shrinks geometrically from ``initial_period`` to
    ``final_period`` over ``total_steps`` (always synchronising at ``total_steps``).

    Paper: *A Single Merging Suffices: Recovering Server-based Learning Performance in Decentralized Learning*
    (2025): concentrating the communication budget late in training improves the merged model.

    Deviations: the paper studies budget allocation over time on decentralised topologies; the geometric
    interpolation ``H(p) = H0^(1−p)·H1^p`` (p = progress in [0, 1]) is our concrete choice.

    Args:
        total_steps: steps of the whole run (the trainer's ``max_steps``), ≥ 1.
        initial_period: H0, the period at the start, ≥ 1. Default 128.
        final_period: H1, the period at the end, ≥ 1. Default 8.
        start_step: DDP steps first, ≥ 0. Default 0.

    Raises:
        TypeError / ValueError: if an argument is not an int in range.

    Example:
        >>> s = IncreasingFrequency(total_steps=100, initial_period=40, final_period=5)
        >>> s.sync_steps[-1]
        100
    """

    def __init__(self, total_steps: int, initial_period: int = 128, final_period: int = 8, start_step: int = 0) -> None:
        super().__init__(start_step)
        self.total_steps = check_int_at_least("IncreasingFrequency", "total_steps", total_steps, 1)
        self.initial_period = check_int_at_least("IncreasingFrequency", "initial_period", initial_period, 1)
        self.final_period = check_int_at_least("IncreasingFrequency", "final_period", final_period, 1)
        self._sync_steps = self._plan()

    def _plan(self) -> frozenset[int]:
        span = max(self.total_steps - self.start_step, 1)
        steps, s = set(), self.start_step
        while s < self.total_steps:
            p = (s - self.start_step) / span
            period = max(1, round(math.exp((1 - p) * math.log(self.initial_period) + p * math.log(self.final_period))))
            s = min(s + period, self.total_steps)
            steps.add(s)
        return frozenset(steps)

    @property
    def sync_steps(self) -> list[int]:
        return sorted(self._sync_steps)

    def should_sync(self, step: int) -> bool:
        return step in self._sync_steps


class SingleFinalMerge(SyncSchedule):
    """No communication during training; one global merge at ``total_steps`` (and at the end of fit).

    Paper: *A Single Merging Suffices: Recovering Server-based Learning Performance in Decentralized Learning*
    (2025): a single global merge at the final step can match server-based training.

    Args:
        total_steps: the step of the single merge, ≥ 1 (the trainer's ``max_steps``).
        start_step: DDP steps first, ≥ 0. Default 0.

    Raises:
        TypeError / ValueError: if an argument is not an int in range.

    Example:
        >>> [s for s in range(1, 6) if SingleFinalMerge(total_steps=5).should_sync(s)]
        [5]
    """

    def __init__(self, total_steps: int, start_step: int = 0) -> None:
        super().__init__(start_step)
        self.total_steps = check_int_at_least("SingleFinalMerge", "total_steps", total_steps, 1)

    def should_sync(self, step: int) -> bool:
        return step == self.total_steps
