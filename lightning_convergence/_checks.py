"""Every argument and state check shared by the package, with one message form (standard library only).

Message: ``"<Class>: `<field>` must be <accepted>, got <value>."``. Exception types follow one rule:

* ``TypeError`` for a value of the wrong type (a ``bool`` is never accepted where an int or a number is meant,
  although Python counts it as one);
* ``ValueError`` for a value of the right type outside the accepted range or set (NaN and ±inf included);
* ``RuntimeError`` for checkpoint state this version cannot read (a bad state at run time, not a bad argument).

Each function returns the value it accepted (normalised: ints stay ints, numbers become ``float``), so a
constructor can check and store in one line. YAML gives ints where floats are meant: every number check accepts
both.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "argument_error",
    "check_bool",
    "check_choice",
    "check_instance",
    "check_int",
    "check_int_at_least",
    "check_number",
    "check_numbers",
    "check_state_version",
]

_SCALARS = (type(None), bool, int, float, str)


def _show(value: Any) -> str:
    """How the received value appears in a message: its repr when short and plain, else its type."""
    if isinstance(value, _SCALARS) or (isinstance(value, (list, tuple)) and all(isinstance(v, _SCALARS)
                                                                                   for v in value)):
        text = repr(value)
        return text if len(text) <= 120 else text[:117] + "..."
    return f"an object of type {type(value).__name__}"


def argument_error(owner: str, field: str, accepted: str, value: Any, kind: type[Exception] = ValueError,
                   hint: str = "") -> Exception:
    """The exception for a check written by hand: ``raise argument_error(owner, field, "...", value)``.

    Use it for conditions the functions below do not cover (a relation between two fields, a length that depends on
    another argument), so every message keeps the one form; ``hint`` (the fix, a sentence) follows it.
    """
    return kind(f"{owner}: `{field}` must be {accepted}, got {_show(value)}." + (f" {hint}" if hint else ""))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high}"
    return ""


def _in_interval(value: float, low: float | None, high: float | None, low_open: bool, high_open: bool) -> bool:
    if low is not None and (value <= low if low_open else value < low):
        return False
    return not (high is not None and (value >= high if high_open else value > high))


def check_int(owner: str, field: str, value: Any, minimum: int | None = None, maximum: int | None = None,
              *, optional: bool = False) -> int | None:
    """Return ``value`` if it is an ``int`` (not a ``bool``) in ``[minimum, maximum]`` (either bound may be None).

    Raises:
        TypeError: for a non-int (a float, a string, a bool). ValueError: for an int outside the bounds.
    """
    if optional and value is None:
        return None
    accepted = "an int" + ("" if minimum is None and maximum is None else " " + _interval(minimum, maximum, False,
                                                                                           False))
    if optional:
        accepted = "None or " + accepted
    if not _is_int(value):
        raise argument_error(owner, field, accepted, value, TypeError)
    if not _in_interval(value, minimum, maximum, False, False):
        raise argument_error(owner, field, accepted, value)
    return value


def check_int_at_least(owner: str, field: str, value: Any, minimum: int) -> int:
    """Return ``value`` if it is an ``int`` (not a ``bool``) ``>= minimum``: :func:`check_int` with one bound.

    Raises:
        TypeError: for a non-int. ValueError: "``{owner}: `{field}` must be an int >= {minimum}, got {value!r}.``"
    """
    return check_int(owner, field, value, minimum)


def check_number(owner: str, field: str, value: Any, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, high_open: bool = False, optional: bool = False) -> float | None:
    """Return ``float(value)`` if it is a finite int or float (not a ``bool``) in the interval given.

    ``low``/``high`` bound the interval, closed unless ``low_open``/``high_open``; either may be None.

    Raises:
        TypeError: for a non-number. ValueError: for NaN, ±inf or a number outside the interval.
    """
    if optional and value is None:
        return None
    bounds = _interval(low, high, low_open, high_open)
    accepted = "a finite number" + (" " + bounds if bounds else "")
    if optional:
        accepted = "None or " + accepted
    if not _is_number(value):
        raise argument_error(owner, field, accepted, value, TypeError)
    if not (math.isfinite(value) and _in_interval(value, low, high, low_open, high_open)):
        raise argument_error(owner, field, accepted, value)
    return float(value)


def check_numbers(owner: str, field: str, values: Any, length: int | None = None, low: float | None = None,
                  high: float | None = None, *, low_open: bool = False, high_open: bool = False) -> list[float]:
    """Return ``values`` as a list of floats if it is a sequence of ``length`` numbers, each as :func:`check_number`.

    Raises:
        TypeError: for a non-sequence (a string included) or a non-number entry. ValueError: for a wrong length or
            an entry outside the interval.
    """
    bounds = _interval(low, high, low_open, high_open)
    count = "" if length is None else f"{length} "
    accepted = f"a list of {count}finite numbers" + (" " + bounds if bounds else "")
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise argument_error(owner, field, accepted, values, TypeError)
    if length is not None and len(values) != length:
        raise argument_error(owner, field, accepted, list(values))
    out = []
    for v in values:
        if not _is_number(v):
            raise argument_error(owner, field, accepted, list(values), TypeError)
        if not (math.isfinite(v) and _in_interval(v, low, high, low_open, high_open)):
            raise argument_error(owner, field, accepted, list(values))
        out.append(float(v))
    return out


def check_bool(owner: str, field: str, value: Any) -> bool:
    """Return ``value`` if it is ``True`` or ``False`` (not 0/1, not a string).

    Raises:
        TypeError: for anything else.
    """
    if not isinstance(value, bool):
        raise argument_error(owner, field, "True or False", value, TypeError)
    return value


def check_choice(owner: str, field: str, value: Any, choices: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``choices`` (listed in the message in the order given).

    Raises:
        ValueError: "``{owner}: `{field}` must be one of 'a', 'b', got 'c'.``"
    """
    options = tuple(choices)
    if value not in options:  # compared by ==, so an unhashable value is rejected, not a crash
        raise argument_error(owner, field, "one of " + ", ".join(repr(c) for c in options), value)
    return value


def check_instance(owner: str, field: str, value: Any, types: type | tuple[type, ...], accepted: str) -> Any:
    """Return ``value`` if ``isinstance(value, types)``; ``accepted`` says it in words ("a ServerRule (e.g. FedBuff)").

    Raises:
        TypeError: naming the type received.
    """
    if not isinstance(value, types):
        raise TypeError(f"{owner}: `{field}` must be {accepted}, got {type(value).__name__}.")
    return value


def check_state_version(owner: str, state: Mapping[str, Any], expected: int) -> None:
    """Raise unless ``state["version"] == expected``; the one place a future migration function would go.

    Raises:
        RuntimeError: "``{owner}: checkpoint `version` must be {expected}, got {found!r}; it cannot be converted.``"
    """
    found = state.get("version") if isinstance(state, Mapping) else None
    if found != expected:
        raise RuntimeError(f"{owner}: checkpoint `version` must be {expected}, got {found!r}; "
                           f"it cannot be converted.")
