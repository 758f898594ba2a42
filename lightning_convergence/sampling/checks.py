"""Argument checks of the group-sampling adapter, kept with the cores they configure (no ``lightning`` import)."""

from __future__ import annotations

from lightning_convergence._checks import argument_error, check_choice, check_int_at_least, check_number
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
    check_choice(name, "policy", policy, POLICIES)
    ints = (
        ("check_every_n_steps", check_every_n_steps, 1), ("min_per_group", min_per_group, 0),
        ("cooldown_start_step", cooldown_start_step, 0), ("cooldown_steps", cooldown_steps, 0),
    )
    for field, value, low in ints:
        check_int_at_least(name, field, value, low)
    if check_int_at_least(name, "probe_per_group", probe_per_group, 0) == 1:
        raise argument_error(name, "probe_per_group", "0 or an int >= 2", probe_per_group)
    if probe_per_group == 0 and policy in ("gvm", "min_variance", "neyman"):
        raise argument_error(name, "probe_per_group", f">= 2 with policy {policy!r} (0 leaves it without statistics)",
                             probe_per_group)
    if reweight and min_per_group < 1:
        raise argument_error(name, "min_per_group", ">= 1 with `reweight=True` (unbiasedness)", min_per_group)
    check_number(name, "ema_beta", ema_beta, 0, 1, high_open=True)
    check_number(name, "alpha", alpha, 0)
    for field, value in (("start_temperature", start_temperature), ("end_temperature", end_temperature)):
        check_number(name, field, value, 0, low_open=True)
    check_choice(name, "gvm_statistic", gvm_statistic, ("mean_norm", "rms_norm"))
    check_choice(name, "cooldown_shape", cooldown_shape, ("linear", "cosine"))
