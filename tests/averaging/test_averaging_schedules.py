"""Communication schedules: fixed H, post-local warm-up, increasing frequency, single final merge."""

from __future__ import annotations

import pytest

from lightning_convergence.averaging import FixedPeriod, IncreasingFrequency, SingleFinalMerge


def _syncs(schedule, n):
    return [s for s in range(1, n + 1) if schedule.should_sync(s)]


def test_averaging_fixed_period_and_post_local_warmup():
    assert _syncs(FixedPeriod(period=3), 10) == [3, 6, 9]
    post = FixedPeriod(period=3, start_step=4)
    assert [post.in_warmup(s) for s in range(6)] == [True, True, True, True, False, False]
    assert _syncs(post, 12) == [7, 10]
    assert _syncs(FixedPeriod(period=1), 3) == [1, 2, 3]


def test_averaging_increasing_frequency_concentrates_syncs_late():
    s = IncreasingFrequency(total_steps=200, initial_period=64, final_period=4)
    steps = s.sync_steps
    assert steps[-1] == 200
    gaps = [b - a for a, b in zip([0, *steps], steps)]
    assert gaps[0] == 64 and gaps[-2] <= 8  # shrinks from H0 towards H1
    assert all(g1 >= g2 for g1, g2 in zip(gaps[:-2], gaps[1:-1]))  # non-increasing (last gap may be cut)
    assert sum(1 for x in steps if x > 100) > sum(1 for x in steps if x <= 100)


def test_averaging_single_final_merge():
    assert _syncs(SingleFinalMerge(total_steps=50), 60) == [50]


@pytest.mark.parametrize(
    ("make", "exc", "match"),
    [
        (lambda: FixedPeriod(period=0), ValueError, "`period`"),
        (lambda: FixedPeriod(period=2.0), TypeError, "`period`"),
        (lambda: FixedPeriod(period=2, start_step=-1), ValueError, "`start_step`"),
        (lambda: IncreasingFrequency(total_steps=0), ValueError, "`total_steps`"),
        (lambda: IncreasingFrequency(total_steps=10, final_period=0), ValueError, "`final_period`"),
        (lambda: SingleFinalMerge(total_steps=True), TypeError, "`total_steps`"),
    ],
)
def test_averaging_schedule_errors(make, exc, match):
    with pytest.raises(exc, match=match):
        make()
