"""Argument checks shared by every part, so one kind of bad value always gets the same message (stdlib only)."""

from __future__ import annotations

from typing import Any

__all__ = ["check_int_at_least"]


def check_int_at_least(owner: str, field: str, value: Any, minimum: int) -> None:
    """Raise unless ``value`` is an ``int`` (not a ``bool``) ``>= minimum``.

    Raises:
        ValueError: "``{owner}: `{field}` must be an int >= {minimum}, got {value!r}.``"
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}: `{field}` must be an int >= {minimum}, got {value!r}.")
