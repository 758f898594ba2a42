"""Argument checks of the group-sampling adapter, kept with the cores they configure (no ``lightning`` import)."""

from __future__ import annotations

from lightning_convergence.sampling.allocation import POLICIES

__all__ = ["check_sampling_args"]


def check_sampling_args(
    name: str, *, policy: str, check_every_n_steps: int, min_per_group: int, cooldown_start_step: int,
    cooldown_steps: int, probe_per_group: int, reweight: bool, ema_beta: float, alpha: float,
    start_temperature: float, end_temperature: float, gvm_statistic: str, cooldown_shape: str,
) -> None:
    """Refuse out-of-range settings with ``{name}: `field` must be ..., got ...``.

    Raises:
        ValueError: an unknown choice or a value out of its range.
    """
    if policy not in POLICIES:
        raise ValueError(f"{name}: `policy` must be one of {POLICIES}, got {policy!r}.")
    ints = (
        ("check_every_n_steps", check_every_n_steps, 1), ("min_per_group", min_per_group, 0),
        ("cooldown_start_step", cooldown_start_step, 0), ("cooldown_steps", cooldown_steps, 0),
    )
    for field, value, low in ints:
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name}: `{field}` must be an int >= {low}, got {value!r}.")
    if not isinstance(probe_per_group, int) or probe_per_group < 0 or probe_per_group == 1:
        raise ValueError(f"{name}: `probe_per_group` must be 0 or an int >= 2, got {probe_per_group!r}.")
    if probe_per_group == 0 and policy in ("gvm", "min_variance", "neyman"):
        raise ValueError(f"{name}: `probe_per_group` = 0 leaves policy {policy!r} without statistics; use >= 2.")
    if reweight and min_per_group < 1:
        raise ValueError(f"{name}: `min_per_group` must be >= 1 with `reweight=True` (unbiasedness), got 0.")
    if not 0.0 <= float(ema_beta) < 1.0:
        raise ValueError(f"{name}: `ema_beta` must be in [0, 1), got {ema_beta}.")
    if float(alpha) < 0:
        raise ValueError(f"{name}: `alpha` must be >= 0, got {alpha}.")
    for field, value in (("start_temperature", start_temperature), ("end_temperature", end_temperature)):
        if not float(value) > 0:
            raise ValueError(f"{name}: `{field}` must be > 0, got {value}.")
    if gvm_statistic not in ("mean_norm", "rms_norm"):
        raise ValueError(f"{name}: `gvm_statistic` must be 'mean_norm' or 'rms_norm', got {gvm_statistic!r}.")
    if cooldown_shape not in ("linear", "cosine"):
        raise ValueError(f"{name}: `cooldown_shape` must be 'linear' or 'cosine', got {cooldown_shape!r}.")
