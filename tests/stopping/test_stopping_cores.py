"""Hand-computed cases for the early-stopping cores: GradES signals and decisions, the norm-test rule, the LR areas
and the scaling-law fit (recovery of known parameters, closed-form projection vs step-by-step)."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from lightning_convergence.stopping import (
    GradES,
    LossCurveRule,
    LRAreas,
    NoiseDominatedRule,
    fit_scaling_law,
)


# -- GradES ---------------------------------------------------------------------------------------------------
def test_grades_grad_signal_is_l1_norm_and_freezes_after_grace() -> None:
    core = GradES(["a", "b"], tau=1.0, grace_fraction=0.5, total_steps=10, signal="grad")
    assert core.grace_steps == 5
    grads = [torch.tensor([[0.25, -0.25]]), torch.tensor([[2.0, -1.0]])]  # L1: 0.5 and 3.0
    sig = core.measure([g.clone() for g in grads])
    assert sig is not None and sig.tolist() == [0.5, 3.0]
    assert core.decide(4, sig) == []  # below tau but inside the grace period
    assert core.update(5, grads) == ["a"]
    assert core.active == ["b"] and core.frozen == {"a": 5} and core.frozen_fraction == 0.5
    assert not core.should_stop
    assert core.update(6, [torch.tensor([[0.1, 0.1]])]) == ["b"] and core.should_stop


def test_grades_weight_change_signal_first_call_only_caches() -> None:
    core = GradES(["w"], tau=1.0, grace_fraction=0.0, total_steps=10, signal="weight_change", reduction="mean")
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert core.update(0, [w]) == []  # the code's 0.0 here would have frozen `w` at once
    assert core.measure([w + torch.tensor([[0.4, -0.4, 0.4, -0.4]])]).tolist() == pytest.approx([0.4])
    # The reference moved to the new weights: an unchanged tensor now has signal 0.
    assert core.measure([w + torch.tensor([[0.4, -0.4, 0.4, -0.4]])]).tolist() == [0.0]


def test_grades_patience_and_nonfinite_reset_the_streak() -> None:
    core = GradES(["w"], tau=1.0, total_steps=10, grace_fraction=0.0, patience=2, signal="grad")
    assert core.decide(0, [0.5]) == []
    assert core.decide(1, [math.nan]) == []  # resets
    assert core.decide(2, [0.5]) == []
    assert core.decide(3, [0.5]) == ["w"]


def test_grades_state_round_trip_and_refuses_unknown_names() -> None:
    core = GradES(["a", "b"], tau=1.0, grace_fraction=0.0, total_steps=10, signal="weight_change")
    core.update(0, [torch.ones(2, 2), torch.ones(2, 2)])
    core.update(1, [torch.ones(2, 2), 3 * torch.ones(2, 2)])
    other = GradES(["a", "b"], tau=1.0, grace_fraction=0.0, total_steps=10, signal="weight_change")
    other.load_state_dict(core.state_dict())
    assert other.frozen == {"a": 1} and torch.equal(other.reference["b"], 3 * torch.ones(2, 2))
    with pytest.raises(RuntimeError, match="lacks"):
        GradES(["x"], tau=1.0, total_steps=10).load_state_dict(core.state_dict())
    with pytest.raises(RuntimeError, match="version"):
        other.load_state_dict({"version": 99})


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"names": []}, "names"), ({"names": ["a", "a"]}, "names"), ({"tau": 0}, "tau"),
     ({"grace_fraction": 1.0}, "grace_fraction"), ({"total_steps": 0}, "total_steps"),
     ({"max_frozen_ratio": 0.0}, "max_frozen_ratio"), ({"signal": "x"}, "signal"), ({"patience": 0}, "patience")],
)
def test_grades_refuses_nonsense(kwargs: dict, field: str) -> None:
    args = {"names": ["a"], "tau": 1.0, "total_steps": 10, **kwargs}
    with pytest.raises(ValueError, match=f"GradES: `{field}`"):
        GradES(**args)


# -- norm test ------------------------------------------------------------------------------------------------


def test_noise_rule_needs_a_full_window_patience_and_min_step() -> None:
    # N = 100, eta = 1, window 2, z = 0: fires when the window mean of |g|^2 < mean tr / 100.
    rule = NoiseDominatedRule(dataset_size=100, eta=1.0, patience=2, min_step=3, window=2, confidence_z=0.0)
    assert not rule.update(0, trace_cov=500.0, grad_sq_norm=1.0)  # window not full yet
    assert not rule.update(1, trace_cov=500.0, grad_sq_norm=1.0)  # mean 1 * 100 < 500: streak 1
    assert rule.last_required_batch == 500.0
    assert not rule.update(2, trace_cov=500.0, grad_sq_norm=-1.0)  # mean 0: streak 2, but step < min_step
    assert rule.update(3, trace_cov=500.0, grad_sq_norm=1.0)  # mean 0: streak 3
    assert not rule.update(4, trace_cov=50.0, grad_sq_norm=10.0)  # mean tr 275 < 100 * 5.5: resets
    assert not rule.update(5, trace_cov=math.nan, grad_sq_norm=1.0)  # skipped, window unchanged
    assert rule.samples == [(500.0, 1.0), (50.0, 10.0)]
    clone = NoiseDominatedRule(dataset_size=100, window=2)
    clone.load_state_dict(rule.state_dict())
    assert clone.samples == rule.samples and clone.streak == 0 and clone.checks == 6


def test_noise_rule_confidence_bound_blocks_noisy_windows() -> None:
    # Window mean of |g|^2 is 0.5 (< 400/100 = 4), but the estimates scatter: sd = 10.6, stderr = 7.5,
    # upper = 0.5 + 2 * 7.5 = 15.5 > 4 -> not established. With z = 0 the same window fires.
    estimates = [(400.0, 8.0), (400.0, -7.0)]
    for z, expected in ((2.0, False), (0.0, True)):
        rule = NoiseDominatedRule(dataset_size=100, patience=1, window=2, confidence_z=z)
        fired = [rule.update(i, t, g) for i, (t, g) in enumerate(estimates)]
        assert fired[-1] is expected
        assert rule.last_grad_sq_upper == pytest.approx(0.5 + z * math.sqrt(112.5 / 2))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"dataset_size": 1}, "dataset_size"), ({"eta": 0.0}, "eta"), ({"patience": 0}, "patience"),
     ({"min_step": -1}, "min_step"), ({"window": 1}, "window"), ({"confidence_z": -1.0}, "confidence_z")],
)
def test_noise_rule_refuses_nonsense(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"NoiseDominatedRule: `{field}`"):
        NoiseDominatedRule(**{"dataset_size": 100, **kwargs})


# -- LR areas and the scaling law -----------------------------------------------------------------------------
def test_lr_areas_by_hand() -> None:
    areas = LRAreas(decay=0.5)
    for lr in (1.0, 1.0, 0.5, 0.25):
        areas.step(lr)
    # m: 0, 0, 0.5, 0.5*0.5 + 0.25 = 0.5 ; S2 = 1.0 ; S1 = 2.75
    assert areas.s1 == 2.75 and areas.s2 == pytest.approx(1.0) and areas.momentum == pytest.approx(0.5)
    plain = LRAreas(decay=0.0)
    for lr in (1.0, 0.8, 0.3):
        plain.step(lr)
    assert plain.s2 == pytest.approx(0.7)  # eta_0 - eta_s


@pytest.mark.parametrize("decay", [0.0, 0.9, 0.999])
def test_projection_matches_stepping(decay: float) -> None:
    lrs = [1e-3] * 50 + [1e-3 * (1 - i / 80) for i in range(80)]
    stepped, projected = LRAreas(decay), LRAreas(decay)
    for lr in lrs:
        stepped.step(lr)
    for lr in lrs[:30]:
        projected.step(lr)
    s1, s2 = projected.project(lrs[30:])
    assert s1 == pytest.approx(stepped.s1, rel=1e-12) and s2 == pytest.approx(stepped.s2, rel=1e-9)


def test_fit_recovers_known_law_with_annealing() -> None:
    areas, s1, s2, loss = LRAreas(0.999), [], [], []
    for lr in [1e-3] * 300 + [1e-3 * (1 - i / 200) for i in range(200)]:
        areas.step(lr)
        s1.append(areas.s1), s2.append(areas.s2), loss.append(2.0 + 0.5 * areas.s1**-0.4 - 30.0 * areas.s2)
    fit = fit_scaling_law(s1, s2, loss)
    assert (fit.l0, fit.a, fit.alpha, fit.c) == pytest.approx((2.0, 0.5, 0.4, 30.0), rel=1e-6)


def test_fit_with_constant_lr_drops_the_annealing_term() -> None:
    s1 = [0.01 * k for k in range(1, 101)]
    loss = [1.0 + 0.2 * s**-0.7 for s in s1]
    fit = fit_scaling_law(s1, [0.0] * 100, loss)
    assert fit.c == 0.0 and (fit.l0, fit.a, fit.alpha) == pytest.approx((1.0, 0.2, 0.7), rel=1e-6)
    with pytest.raises(ValueError, match="at least 3 points"):
        fit_scaling_law([1.0, 2.0], [0.0, 0.0], [1.0, 0.5])


def test_loss_curve_rule_fires_once_the_remaining_gain_is_small() -> None:
    # Noise-free law, constant LR 0.01 for a budget of 1000 steps: the predicted remaining gain
    # 0.2 * (S1^-0.7 - 10^-0.7) falls below 0.01 at S1 = 4.7 (step ~470); patience 2 -> fires one check later.
    rule = LossCurveRule(min_delta=0.01, patience=2, min_points=5)
    fired_at = None
    for step in range(1, 1001):
        rule.areas.step(0.01)
        rule.record(step, 1.0 + 0.2 * rule.areas.s1**-0.7)
        if step % 10 == 0 and rule.check(step, future_lrs=[0.01] * (1000 - step)):
            fired_at = step
            break
    expected = math.ceil(100 * ((0.01 / 0.2 + 10**-0.7) ** (-1 / 0.7)))  # first step with gain < 0.01
    assert fired_at is not None and expected <= fired_at <= expected + 20
    clone = LossCurveRule(min_delta=0.01)
    clone.load_state_dict(rule.state_dict())
    assert clone.history == rule.history and clone.last_fit == rule.last_fit


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"min_delta": -0.1}, "min_delta"), ({"patience": 0}, "patience"), ({"min_step": -1}, "min_step"),
     ({"min_points": 3}, "min_points")],
)
def test_loss_curve_rule_refuses_nonsense(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"LossCurveRule: `{field}`"):
        LossCurveRule(**{"min_delta": 0.0, **kwargs})


def test_cores_do_not_import_lightning(monkeypatch) -> None:
    import importlib

    for mod in [m for m in sys.modules if m.startswith("lightning_convergence.stopping")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "lightning", None)
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    importlib.import_module("lightning_convergence.stopping")
