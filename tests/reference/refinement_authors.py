"""The refined schedule as the authors' code builds it (facebookresearch/adaptive_scheduling: ``visual.py`` and
``find_schedule.find_closed_form_schedule``), transcribed with numpy and scipy from reading it.

Norms shorter than ``nvals`` are interpolated up to ``nvals``; the median filter's width is fixed by ``nvals``
(``2*(int(sigma2*nvals)//2) + 1``) and applied at the run's own resolution; the filtered norms are interpolated to
``nvals`` points; weights ``G^-2`` (l2) or ``G^-1`` (l1); ``sched[t] = w_t · Σ_{k>t} w_k / Σ_k w_k``, last 0, then
divided by its maximum. (The authors' script also drops two values at each end of its recorded files, a fix for its
exports, and infinite values; both are left out here.)
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import median_filter


def refined_schedule_authors(gnorms: np.ndarray, l1: bool = False, nvals: int = 10_000,
                             sigma2: float = 0.1) -> np.ndarray:
    gnorms = np.asarray(gnorms, dtype=np.float64)
    glen = len(gnorms)
    if glen < nvals:
        gnorms = np.interp(np.linspace(0, 1.0, nvals), np.linspace(0, 1.0, glen), gnorms)
        glen = len(gnorms)
    filter_width = 2 * (int(sigma2 * nvals) // 2) + 1
    pad = 2 * filter_width
    filtered = median_filter(np.pad(gnorms, (0, pad), mode="reflect"), size=filter_width, mode="nearest")[:-pad]
    smoothed = np.interp(np.linspace(0, 1.0, nvals), np.linspace(0, 1.0, glen), filtered)
    weights = smoothed**-1.0 if l1 else smoothed**-2.0
    tail_sums = np.flip(np.cumsum(np.flip(weights)))
    sched = np.zeros(nvals)
    for t in range(nvals - 1):
        sched[t] = weights[t] * tail_sums[t + 1] / tail_sums[-1]
    return sched / np.max(sched)
