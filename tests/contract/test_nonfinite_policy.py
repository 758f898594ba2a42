"""The shared non-finite policy: accepted values, the message form, and what each policy does to the trainer."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from lightning_convergence._nonfinite import act_on_nonfinite, check_nonfinite_policy


def test_policy_check_names_the_field_and_values():
    assert check_nonfinite_policy("X", "skip") == "skip"
    with pytest.raises(ValueError, match="X: `on_nonfinite` must be one of 'stop', 'skip', got 'ignore'"):
        check_nonfinite_policy("X", "ignore")


def test_stop_sets_should_stop_and_always_reports(caplog):
    trainer = SimpleNamespace(should_stop=False, global_rank=0, global_step=5)
    with caplog.at_level(logging.WARNING, logger="lightning_convergence"):
        assert act_on_nonfinite(trainer, "Part", "stop", "gradients", warned=True)
    assert trainer.should_stop
    assert "Part: non-finite gradients at optimizer step 5; the step was not applied" in caplog.text


def test_skip_warns_once_and_keeps_training(caplog):
    trainer = SimpleNamespace(should_stop=False, global_rank=0, global_step=3)
    with caplog.at_level(logging.WARNING, logger="lightning_convergence"):
        warned = act_on_nonfinite(trainer, "Part", "skip", "loss")
        warned = act_on_nonfinite(trainer, "Part", "skip", "loss", warned=warned)
    assert warned and not trainer.should_stop
    assert caplog.text.count("non-finite loss") == 1
