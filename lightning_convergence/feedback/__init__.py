"""Error-feedback rules over any compressor: classic EF, EF21, EF21-SGDM, EControl (and no feedback).

Each rule keeps per-worker state keyed by parameter name and exposes ``message`` (worker side) and ``update``
(after averaging). Imports torch only (never ``lightning``).
"""

from __future__ import annotations

from lightning_convergence._checks import argument_error, check_choice
from lightning_convergence.feedback.base import FeedbackRule, NoFeedback
from lightning_convergence.feedback.econtrol import EControl
from lightning_convergence.feedback.ef14 import EF14
from lightning_convergence.feedback.ef21 import EF21
from lightning_convergence.feedback.ef21_sgdm import EF21SGDM

__all__ = ["EF14", "EF21", "EF21SGDM", "RULES", "EControl", "FeedbackRule", "NoFeedback", "make_rule"]

RULES: dict[str, type[FeedbackRule]] = {
    "none": NoFeedback, "ef14": EF14, "ef21": EF21, "ef21_sgdm": EF21SGDM, "econtrol": EControl,
}


def make_rule(feedback: str | FeedbackRule, owner: str = "make_rule") -> FeedbackRule:
    """A rule from its short name (default hyperparameters) or an instance (returned as is).

    Raises:
        ValueError: for an unknown name.  TypeError: for anything else.
    """
    if isinstance(feedback, FeedbackRule):
        return feedback
    if isinstance(feedback, str):
        return RULES[check_choice(owner, "feedback", feedback, RULES)]()
    raise argument_error(owner, "feedback", "a rule name or a FeedbackRule", feedback, TypeError)
