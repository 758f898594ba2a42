"""One policy for non-finite losses and gradients, shared by every callback and strategy (imports torch only).

It follows Lightning's ``EarlyStopping(check_finite=True)``: a part that finds a non-finite value never folds it
into its state (EF residuals, EMAs, outer momentum, buffers), and then

* ``"stop"`` (the default everywhere): the step that produced it is not applied, the part reports once, naming
  itself, the optimizer step and what was non-finite, and sets ``trainer.should_stop`` so training ends cleanly at
  the step boundary (every rank takes the same branch: the caller passes a decision that is already global);
* ``"skip"``: the step (or the one contribution) is dropped, counted under
  ``convergence/<part>/nonfinite_skipped_total`` (one count per optimizer step, not per tensor), and training goes
  on; the part warns once, on the first skip.

Hyperparameter name in every part: ``on_nonfinite``.
"""

from __future__ import annotations

import logging
from typing import Any

from lightning_convergence._checks import check_choice

__all__ = ["NONFINITE_POLICIES", "check_nonfinite_policy", "nonfinite_message", "act_on_nonfinite"]

NONFINITE_POLICIES: tuple[str, ...] = ("stop", "skip")

log = logging.getLogger("lightning_convergence")


def check_nonfinite_policy(owner: str, value: Any) -> str:
    """Return ``value`` if it is one of :data:`NONFINITE_POLICIES`.

    Raises:
        ValueError: "``{owner}: `on_nonfinite` must be one of 'stop', 'skip', got {value!r}.``"
    """
    return check_choice(owner, "on_nonfinite", value, NONFINITE_POLICIES)


def nonfinite_message(owner: str, step: int, what: str, policy: str) -> str:
    """The one message form: ``{owner}: non-finite {what} at optimizer step {step}; ...``."""
    if policy == "stop":
        action = "the step was not applied and training stops (pass `on_nonfinite='skip'` to drop such steps)"
    else:
        action = "the step was skipped and counted in nonfinite_skipped_total (`on_nonfinite='skip'`)"
    return f"{owner}: non-finite {what} at optimizer step {step}; {action}."


def act_on_nonfinite(trainer: Any, owner: str, policy: str, what: str, *, warned: bool = False) -> bool:
    """Apply ``policy`` after a (global) non-finite finding; returns True once a message has been written.

    ``"stop"`` sets ``trainer.should_stop`` and always reports; ``"skip"`` reports only when ``warned`` is False (the
    caller keeps that flag, so the warning appears once per part). Only global rank 0 writes the message.
    """
    if policy == "stop":
        trainer.should_stop = True
    if policy == "stop" or not warned:
        if int(getattr(trainer, "global_rank", 0)) == 0:
            log.warning(nonfinite_message(owner, int(getattr(trainer, "global_step", 0)), what, policy))
        return True
    return warned
