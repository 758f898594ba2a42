"""State-dict versioning shared by every stateful part (imports nothing but the standard library)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["check_state_version"]


def check_state_version(owner: str, state: Mapping[str, Any], expected: int) -> None:
    """Raise unless ``state["version"] == expected``; the one place a future migration function would go.

    Raises:
        RuntimeError: naming ``owner``, the field ``version``, the value found and the one supported.
    """
    found = state.get("version")
    if found != expected:
        raise RuntimeError(f"{owner}: checkpoint state `version` {found!r} is not {expected}; it cannot be converted.")
