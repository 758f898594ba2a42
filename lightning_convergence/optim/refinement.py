"""Schedule refinement: turn a run's per-step gradient norms into a learning-rate schedule for the next run.

Paper: Defazio, Cutkosky, Mehta, Mishchenko. *When, Why and How Much? Adaptive Learning Rate Scheduling by
Refinement.* arXiv:2310.07831, 2023. Formulas checked against the authors' code (``facebookresearch/
adaptive_scheduling``, ``find_closed_form_schedule``); see ``shared/papers/ALGORITHMS.md`` section 12::

    norms G_t of run 1 (SGD: l2 norm of the gradient, Adam-type: l1 norm)
    runs shorter than n points (default 10,000) are interpolated up to n; longer runs stay at full resolution
    median filter of width w = 2*floor(tau*n/2) + 1 points (tau = 0.1; a fixed 1,001 points, so 10% of a run of
        up to 10,000 steps and 1% of a 100,000-step run), right end padded by 2w reflected values, edges 'nearest'
    resample the filtered norms to n points (``visual.py`` of the authors' code)
    weights  w_t = G_t^-2 (l2 / SGD)   or   w_t = G_t^-1 (l1 / Adam)
    eta_t = w_t * sum_{p > t} w_p,   normalised to peak 1 (so eta_T = 0)
    run 2:  lr(step) = peak_lr * eta(relative time)

Constant norms give exactly linear decay (the worst-case optimal schedule). Early steps have large norms, so the
refined schedule grows its own warm-up.

Beyond the paper (:func:`online_profile`): during a single run, refit from the norms seen so far and extrapolate the
most recent smoothed norm as constant over the remaining budget. The future part of such a fit is linear decay, and
its level falls when the recent norms grow relative to the past ones. ``ScheduleRefinement(online=True)`` applies it.

This module imports only torch (a core).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_convergence._checks import argument_error, check_choice, check_int, check_number
from lightning_convergence.optim.schedules import BudgetSchedule

__all__ = [
    "NORM_TYPES",
    "RefinedSchedule",
    "interp_profile",
    "load_norms",
    "median_smooth",
    "online_profile",
    "refine_schedule",
    "refinement_weights",
    "resample",
    "save_norms",
    "schedule_from_weights",
]

NORM_TYPES = ("l1", "l2")
NORMS_FILE_VERSION = 1


def _check_norm_type(norm_type: str, owner: str) -> str:
    return check_choice(owner, "norm_type", norm_type, NORM_TYPES)


def resample(values: Tensor | Sequence[float], n: int) -> Tensor:
    """Linear interpolation of ``values`` (on an even grid over [0, 1]) to ``n`` evenly spaced points (float64)."""
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    check_int("resample", "n", n, 1)
    if v.numel() == n:
        return v.clone()
    if v.numel() == 1:
        return v.expand(n).clone()
    pos = torch.linspace(0.0, float(v.numel() - 1), n, dtype=torch.float64)
    lo = pos.floor().long().clamp(max=v.numel() - 2)
    frac = pos - lo.to(torch.float64)
    return v[lo] * (1.0 - frac) + v[lo + 1] * frac


def _reflect_index(i: Tensor, n: int) -> Tensor:
    """Indices of numpy's ``mode='reflect'`` padding (mirror without repeating the edge), any pad width."""
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * (n - 1)
    j = torch.remainder(i, period)
    return torch.where(j >= n, period - j, j)


def median_smooth(values: Tensor | Sequence[float], tau: float = 0.1, width_points: int | None = None) -> Tensor:
    """The paper's median filter: width ``w = 2*floor(tau*m/2) + 1``, right end padded by ``2w`` reflected values.

    ``m`` is ``width_points`` (the authors' code: the 10,000 points of the schedule, whatever the run's length) or,
    by default, the number of values. Equivalent to
    ``scipy.ndimage.median_filter(np.pad(G, (0, 2w), mode='reflect'), size=w, mode='nearest')[:-2w]`` (checked in
    the tests). ``tau = 0`` (``w = 1``) returns the input unchanged. Memory stays bounded on long runs (windows
    are taken in blocks).
    """
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    n = v.numel()
    check_number("median_smooth", "tau", tau, 0, 1)
    w = 2 * math.floor(tau * (n if width_points is None else int(width_points)) / 2) + 1
    if w == 1 or n == 0:
        return v.clone()
    padded = v[_reflect_index(torch.arange(n + 2 * w), n)]
    h = w // 2
    edged = torch.cat([padded[:1].expand(h), padded, padded[-1:].expand(h)])
    block = max(1, 4_000_000 // w)  # output positions per block: at most ~4M window entries in memory
    out = [edged[j : j + min(block, n - j) + w - 1].unfold(0, w, 1).median(dim=1).values for j in range(0, n, block)]
    return torch.cat(out)


def refinement_weights(smoothed: Tensor, norm_type: str) -> Tensor:
    """``w_t = G_t^-2`` for ``l2`` (SGD-type) and ``G_t^-1`` for ``l1`` (Adam-type). Norms must be > 0."""
    _check_norm_type(norm_type, "refinement_weights")
    g = smoothed.to(torch.float64)
    if not bool((g > 0).all()) or not bool(torch.isfinite(g).all()):
        raise ValueError("refinement_weights: gradient norms must be finite and > 0.")
    return g.pow(-2.0) if norm_type == "l2" else g.reciprocal()


def schedule_from_weights(weights: Tensor) -> Tensor:
    """``eta_t = w_t * sum_{p > t} w_p``, normalised to peak 1 (the last entry is 0)."""
    w = weights.to(torch.float64)
    suffix = torch.flip(torch.cumsum(torch.flip(w, [0]), 0), [0]) - w  # sum over p > t
    eta = w * suffix
    peak = eta.max()
    if not bool(peak > 0):
        raise ValueError("schedule_from_weights: need at least 2 steps with positive weight.")
    return eta / peak


def refine_schedule(
    norms: Tensor | Sequence[float],
    norm_type: str = "l2",
    tau: float = 0.1,
    resample_points: int | None = 10_000,
) -> Tensor:
    """The refined schedule (peak 1, last 0) from one run's per-step gradient norms, as in the paper.

    Args:
        norms: per-step norms ``G_t`` (l2 for SGD-type, l1 for Adam-type), at least 2 values, all > 0.
        norm_type: ``"l2"`` (weights ``G^-2``) or ``"l1"`` (weights ``G^-1``).
        tau: median-filter width as a fraction of ``resample_points`` (paper: 0.1). 0 disables smoothing.
        resample_points: the schedule's points ``n`` (paper: 10,000). A run with fewer steps is interpolated up to
            ``n`` before filtering; a longer one is filtered at full resolution (the window stays ``tau·n`` points,
            as in the authors' code) and then resampled to ``n``. ``None`` keeps one point per step and a window of
            ``tau`` times the run (used for hand-computed checks).

    Returns:
        float64 tensor of length ``resample_points`` (or ``len(norms)``), evenly spaced over relative time [0, 1].
    """
    _check_norm_type(norm_type, "refine_schedule")
    g = torch.as_tensor(norms, dtype=torch.float64).reshape(-1)
    if g.numel() < 2:
        raise ValueError(f"refine_schedule: need at least 2 gradient norms, got {g.numel()}.")
    if resample_points is None:
        smoothed = median_smooth(g, tau)
    else:
        n = int(resample_points)
        if g.numel() < n:
            g = resample(g, n)
        smoothed = resample(median_smooth(g, tau, width_points=n), n)
    return schedule_from_weights(refinement_weights(smoothed, norm_type))


def interp_profile(profile: Sequence[float], u: float) -> float:
    """Value of a profile sampled evenly over [0, 1] at relative time ``u`` (clamped), linear in between."""
    n = len(profile)
    if n == 1:
        return float(profile[0])
    x = min(max(u, 0.0), 1.0) * (n - 1)
    i = min(int(x), n - 2)
    f = x - i
    return float(profile[i] * (1.0 - f) + profile[i + 1] * f)


def online_profile(
    norms: Tensor | Sequence[float],
    total_steps: int,
    norm_type: str = "l2",
    tau: float = 0.1,
    max_points: int = 10_000,
) -> Tensor:
    """Online refit: the refined schedule over ``total_steps`` from the first ``k`` observed norms.

    The observed norms are median-smoothed (after resampling to at most ``max_points`` points so the cost of a refit
    stays bounded: past ``max_points`` observed steps the window is ``tau`` of the steps seen, not the fixed
    ``tau·max_points`` points of :func:`refine_schedule`) and the last smoothed value is extrapolated as constant
    for steps ``k..T-1``. Returns a float64 tensor of length ``total_steps`` with peak 1 (past and future steps
    alike).

    Raises:
        ValueError: for fewer than 2 norms, or ``total_steps`` smaller than the number of norms.
    """
    _check_norm_type(norm_type, "online_profile")
    g = torch.as_tensor(norms, dtype=torch.float64).reshape(-1)
    k = g.numel()
    if k < 2:
        raise ValueError(f"online_profile: need at least 2 gradient norms, got {k}.")
    if total_steps < k:
        raise argument_error("online_profile", "total_steps", f">= the {k} norms seen", total_steps)
    m = min(k, int(max_points))
    smoothed = resample(median_smooth(resample(g, m), tau), k)
    future = smoothed[-1:].expand(total_steps - k)
    return schedule_from_weights(refinement_weights(torch.cat([smoothed, future]), norm_type))


# -- norms files ---------------------------------------------------------------------------------------------------
def save_norms(path: str | os.PathLike, norms: Sequence[float], norm_type: str, **meta: Any) -> Path:
    """Write ``{"version", "norm_type", "norms", **meta}`` as JSON (``.json``) or with ``torch.save`` (otherwise)."""
    _check_norm_type(norm_type, "save_norms")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"version": NORMS_FILE_VERSION, "norm_type": norm_type, "norms": [float(x) for x in norms], **meta}
    if path.suffix == ".json":
        path.write_text(json.dumps(record))
    else:
        torch.save(record, path)
    return path


def load_norms(path: str | os.PathLike) -> dict[str, Any]:
    """Read a file written by :func:`save_norms` (or by ``ScheduleRefinement``); JSON or ``torch.save``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_norms: no gradient-norms file at {str(path)!r} (record one with "
                                f"the ScheduleRefinement callback first).")
    if path.suffix == ".json":
        record = json.loads(path.read_text())
    else:
        record = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(record, dict) or "norms" not in record:
        raise ValueError(f"load_norms: {str(path)!r} holds no `norms` entry.")
    if record.get("version", NORMS_FILE_VERSION) != NORMS_FILE_VERSION:
        raise ValueError(f"load_norms: file `version` {record.get('version')!r} is not {NORMS_FILE_VERSION}.")
    return record


# -- scheduler ----------------------------------------------------------------------------------------------------
class RefinedSchedule(BudgetSchedule):
    """LR scheduler applying the refined schedule of a previous run's gradient norms, rescaled to this run's budget.

    Paper: Defazio, Cutkosky, Mehta, Mishchenko. *When, Why and How Much? Adaptive Learning Rate Scheduling by
    Refinement.* arXiv:2310.07831, 2023 (run 2 of the two-run method).

    The profile (peak 1, computed by :func:`refine_schedule`) is read in relative time: step ``s`` after warm-up maps
    to ``u = (s - W) / (T - W)``, the recorded run's last step to ``u = 1`` (rate 0). With constant norms this is
    :class:`~lightning_convergence.optim.schedules.LinearDecay` exactly.

    Deviations: optional extra linear warm-up and ``min_lr_ratio`` floor (both off by default; the paper uses
    neither, the refined profile already ramps up when early norms are large).

    Args:
        optimizer: the wrapped optimizer; each group's initial ``lr`` is the peak (retune it: the paper does).
        norms: path to a norms file written by ``ScheduleRefinement`` (``.json`` or ``.pt``), or the list of
            per-step norms itself.
        total_steps: this run's budget ``T`` in optimizer steps (may differ from the recorded run's).
        norm_type: ``"l1"`` or ``"l2"``; default ``None`` takes it from the file (required with a list).
        warmup_steps: extra linear warm-up steps ``W``. Default 0.
        min_lr_ratio: floor ``eta_min / eta_max`` in ``[0, 1]``. Default 0.
        smoothing_tau: median-filter width fraction ``tau``. Default 0.1 (the paper's).
        resample_points: points the norms are resampled to before smoothing. Default 10,000 (the paper's).
        last_epoch: leave at -1.

    State: the step count and the computed profile (so resuming does not need the norms file).

    Raises:
        ValueError: for a bad ``norm_type``, fewer than 2 norms, non-positive norms, or the base-class checks.
        FileNotFoundError: if ``norms`` names a missing file.

    Example (YAML, with LightningCLI)::

        lr_scheduler:
          class_path: lightning_convergence.optim.RefinedSchedule
          init_args: {norms: runs/record/refinement_norms.json, total_steps: 600}
    """

    def __init__(
        self,
        optimizer: Optimizer,
        norms: str | list[float],
        total_steps: int,
        norm_type: str | None = None,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        smoothing_tau: float = 0.1,
        resample_points: int = 10_000,
        last_epoch: int = -1,
    ) -> None:
        if isinstance(norms, (str, os.PathLike)):
            record = load_norms(norms)
            values = record["norms"]
            norm_type = norm_type or record.get("norm_type")
            self.norms_source = str(norms)
        else:
            values = list(norms)
            self.norms_source = "list"
        self.norm_type = _check_norm_type(norm_type, "RefinedSchedule")  # None (a list without a type) fails too
        self.smoothing_tau = check_number("RefinedSchedule", "smoothing_tau", smoothing_tau, 0, 1)
        self.resample_points = check_int("RefinedSchedule", "resample_points", resample_points, 2)
        self.profile: list[float] = refine_schedule(values, norm_type, self.smoothing_tau,
                                                    self.resample_points).tolist()
        super().__init__(optimizer, total_steps, warmup_steps, min_lr_ratio, last_epoch)

    def shape(self, z: float) -> float:
        return interp_profile(self.profile, z)
