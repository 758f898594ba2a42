"""The shared checks: wrong type → TypeError (bools never pass as ints or numbers), wrong value → ValueError, the
boundary itself on the right side, and every message of the form "Class: `field` must be <accepted>, got <value>."."""

from __future__ import annotations

import math
import re

import pytest

from lightning_convergence._checks import (
    argument_error,
    check_bool,
    check_choice,
    check_instance,
    check_int,
    check_int_at_least,
    check_number,
    check_numbers,
    check_state_version,
)


def _form(accepted: str, got: str) -> str:
    return re.escape(f"Owner: `field` must be {accepted}, got {got}.")


# ------------------------------------------------------------------ check_int / check_int_at_least
@pytest.mark.parametrize("bad", [True, False, 1.0, "3", None])
def test_check_int_rejects_non_ints_and_bools_with_type_error(bad):
    with pytest.raises(TypeError, match=_form("an int >= 1", repr(bad))):
        check_int("Owner", "field", bad, 1)


def test_check_int_boundaries_are_inclusive():
    assert check_int("Owner", "field", 1, 1, 3) == 1 and check_int("Owner", "field", 3, 1, 3) == 3
    with pytest.raises(ValueError, match=_form("an int in [1, 3]", "0")):
        check_int("Owner", "field", 0, 1, 3)
    with pytest.raises(ValueError, match=_form("an int in [1, 3]", "4")):
        check_int("Owner", "field", 4, 1, 3)
    with pytest.raises(ValueError, match=_form("an int <= 3", "4")):
        check_int("Owner", "field", 4, maximum=3)
    assert check_int("Owner", "field", -7) == -7  # no bound: any int


def test_check_int_optional_accepts_none_and_says_so():
    assert check_int("Owner", "field", None, 0, optional=True) is None
    with pytest.raises(ValueError, match=_form("None or an int >= 0", "-1")):
        check_int("Owner", "field", -1, 0, optional=True)


def test_check_int_at_least():
    assert check_int_at_least("Owner", "field", 2, 2) == 2
    with pytest.raises(ValueError, match=_form("an int >= 2", "1")):
        check_int_at_least("Owner", "field", 1, 2)
    with pytest.raises(TypeError, match=_form("an int >= 2", "True")):
        check_int_at_least("Owner", "field", True, 2)


# ------------------------------------------------------------------ check_number / check_numbers
@pytest.mark.parametrize("bad", [True, "0.5", None, [0.5]])
def test_check_number_rejects_non_numbers_and_bools_with_type_error(bad):
    with pytest.raises(TypeError, match=r"^Owner: `field` must be a finite number in \(0, 1\], got "):
        check_number("Owner", "field", bad, 0, 1, low_open=True)


def test_check_number_interval_ends_and_non_finite_values():
    assert check_number("Owner", "field", 1, 0, 1, low_open=True) == 1.0  # closed end included, int → float
    assert isinstance(check_number("Owner", "field", 1, 0, 1, low_open=True), float)
    with pytest.raises(ValueError, match=_form("a finite number in (0, 1]", "0")):
        check_number("Owner", "field", 0, 0, 1, low_open=True)  # open end excluded
    with pytest.raises(ValueError, match=_form("a finite number in [0, 1)", "1.0")):
        check_number("Owner", "field", 1.0, 0, 1, high_open=True)
    with pytest.raises(ValueError, match=_form("a finite number > 0", "nan")):
        check_number("Owner", "field", math.nan, 0, low_open=True)
    with pytest.raises(ValueError, match=_form("a finite number", "inf")):
        check_number("Owner", "field", math.inf)
    assert check_number("Owner", "field", None, 0, optional=True) is None


def test_check_numbers_length_entries_and_types():
    assert check_numbers("Owner", "field", [1, 2.5], 2, 0) == [1.0, 2.5]
    with pytest.raises(ValueError, match=_form("a list of 3 finite numbers >= 0", "[1, 2.5]")):
        check_numbers("Owner", "field", [1, 2.5], 3, 0)
    with pytest.raises(ValueError, match=_form("a list of finite numbers >= 0", "[1, -0.5]")):
        check_numbers("Owner", "field", [1, -0.5], low=0)
    with pytest.raises(TypeError, match=_form("a list of finite numbers", "[1, True]")):
        check_numbers("Owner", "field", [1, True])
    with pytest.raises(TypeError, match=_form("a list of finite numbers", "'12'")):
        check_numbers("Owner", "field", "12")


# ------------------------------------------------------------------ bool, choice, instance, hand-written
def test_check_bool_accepts_only_true_and_false():
    assert check_bool("Owner", "field", False) is False
    for bad in (0, 1, "true", None):
        with pytest.raises(TypeError, match=_form("True or False", repr(bad))):
            check_bool("Owner", "field", bad)


def test_check_choice_lists_the_options_in_order():
    assert check_choice("Owner", "field", "b", ("a", "b")) == "b"
    with pytest.raises(ValueError, match=_form("one of 'a', 'b'", "'c'")):
        check_choice("Owner", "field", "c", ("a", "b"))
    with pytest.raises(ValueError, match=_form("one of 'a', 'b'", "['a']")):
        check_choice("Owner", "field", ["a"], ("a", "b"))  # an unhashable value: ValueError, no crash


def test_check_instance_names_the_type_received():
    assert check_instance("Owner", "field", 3, int, "an int") == 3
    with pytest.raises(TypeError, match=_form("a ServerRule (e.g. FedBuff)", "dict")):
        check_instance("Owner", "field", {}, (int, float), "a ServerRule (e.g. FedBuff)")


def test_argument_error_keeps_the_form_and_shows_objects_by_type():
    err = argument_error("Owner", "field", "1 + 2 entries", object(), TypeError)
    assert isinstance(err, TypeError)
    assert str(err) == "Owner: `field` must be 1 + 2 entries, got an object of type object."
    assert str(argument_error("Owner", "field", "short", "x" * 200)).endswith("...")  # long values are cut
    assert str(argument_error("Owner", "field", ">= 3", 2, hint="Launch fewer.")) == (
        "Owner: `field` must be >= 3, got 2. Launch fewer.")


def test_check_state_version():
    check_state_version("Owner", {"version": 2}, 2)
    for state in ({"version": 1}, {}, None):
        found = None if not state else 1
        with pytest.raises(RuntimeError, match=re.escape(f"Owner: checkpoint `version` must be 2, got {found!r}")):
            check_state_version("Owner", state, 2)
