"""Schedule refinement core: hand-computed schedules, constant norms -> linear decay, scipy-equal smoothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import median_filter

from lightning_convergence.optim import LinearDecay, RefinedSchedule, load_norms, save_norms
from lightning_convergence.optim.refinement import (
    median_smooth,
    online_profile,
    refine_schedule,
    refinement_weights,
    resample,
)
from tests.helpers.schedules import lr_sequence


def _opt(lr: float = 1.0) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def test_refinement_hand_computed_l2():
    # G = [1, 2, 1, 2], w = G^-2 = [1, 1/4, 1, 1/4]; sums over p > t: [3/2, 5/4, 1/4, 0];
    # eta = w * sum = [3/2, 5/16, 1/4, 0]; / (3/2) = [1, 5/24, 1/6, 0].
    eta = refine_schedule([1.0, 2.0, 1.0, 2.0], "l2", tau=0.0, resample_points=None)
    assert eta.tolist() == pytest.approx([1.0, 5 / 24, 1 / 6, 0.0], abs=1e-15)


def test_refinement_hand_computed_l1():
    # G = [2, 1, 4], w = 1/G = [1/2, 1, 1/4]; sums over p > t: [5/4, 1/4, 0]; eta = [5/8, 1/4, 0] -> /(5/8).
    eta = refine_schedule([2.0, 1.0, 4.0], "l1", tau=0.0, resample_points=None)
    assert eta.tolist() == pytest.approx([1.0, 0.4, 0.0], abs=1e-15)


@pytest.mark.parametrize("norm_type", ["l1", "l2"])
@pytest.mark.parametrize("resample_points", [None, 10_000])
def test_refinement_constant_norms_give_linear_decay(norm_type, resample_points):
    eta = refine_schedule([3.7] * 50, norm_type, tau=0.1, resample_points=resample_points)
    n = eta.numel()
    assert eta.tolist() == pytest.approx([1 - i / (n - 1) for i in range(n)], abs=1e-12)


def test_refinement_constant_norms_scheduler_equals_linear_decay():
    # Recorded over 37 steps, applied to a 100-step run with warm-up: exactly LinearDecay.
    opt_a, opt_b = _opt(0.3), _opt(0.3)
    refined = lr_sequence(RefinedSchedule(opt_a, norms=[0.5] * 37, norm_type="l2", total_steps=100, warmup_steps=10),
                   opt_a, 100)
    linear = lr_sequence(LinearDecay(opt_b, total_steps=100, warmup_steps=10), opt_b, 100)
    assert refined == pytest.approx(linear, rel=1e-12, abs=1e-14)  # float rounding of the interpolation only


@pytest.mark.parametrize("tau", [0.05, 0.1, 0.5])
def test_refinement_median_smooth_equals_scipy_reference(tau):
    g = np.random.default_rng(0).lognormal(size=211)
    w = 2 * int(tau * g.size / 2) + 1
    ref = median_filter(np.pad(g, (0, 2 * w), mode="reflect"), size=w, mode="nearest")[: -2 * w]
    assert np.array_equal(median_smooth(g, tau).numpy(), ref)


def test_refinement_resample_endpoints_and_linear():
    r = resample([0.0, 1.0, 4.0], 5)
    assert r.tolist() == pytest.approx([0.0, 0.5, 1.0, 2.5, 4.0])


def test_refinement_growing_norms_decay_faster_than_linear():
    # Paper's observation: norms that grow late give a schedule below linear decay in the second half.
    eta = refine_schedule(np.linspace(1.0, 3.0, 200).tolist(), "l2", tau=0.1, resample_points=None)
    lin = 1 - np.arange(200) / 199
    assert (eta.numpy()[100:-1] < lin[100:-1]).all()


def test_refinement_online_profile_constant_is_linear_and_future_extrapolated():
    prof = online_profile([2.0] * 10, total_steps=30, norm_type="l2", tau=0.1)
    assert prof.tolist() == pytest.approx([1 - t / 29 for t in range(30)], abs=1e-12)
    # A recent norm twice the past ones: future weights 1/4 of past weights, so the rate at step 10 drops.
    prof2 = online_profile([1.0] * 10 + [2.0] * 10, total_steps=40, norm_type="l2", tau=0.0)
    assert prof2[20].item() < prof2[0].item() * 0.5


def test_refinement_norms_file_roundtrip(tmp_path):
    for name in ("n.json", "n.pt"):
        path = save_norms(tmp_path / name, [1.0, 2.0, 3.0], "l1", global_step=3)
        rec = load_norms(path)
        assert rec["norms"] == [1.0, 2.0, 3.0] and rec["norm_type"] == "l1" and rec["global_step"] == 3
    sched = RefinedSchedule(_opt(), norms=str(tmp_path / "n.json"), total_steps=10)
    assert sched.norm_type == "l1"


def test_refinement_scheduler_state_dict_resume():
    norms = np.random.default_rng(1).lognormal(size=64).tolist()
    opt = _opt()
    full = lr_sequence(RefinedSchedule(opt, norms=norms, norm_type="l2", total_steps=40), opt, 40)
    opt1 = _opt()
    s1 = RefinedSchedule(opt1, norms=norms, norm_type="l2", total_steps=40)
    lr_sequence(s1, opt1, 15)
    opt2 = _opt()
    s2 = RefinedSchedule(opt2, norms=[1.0, 1.0], norm_type="l2", total_steps=40)  # different norms: state wins
    s2.load_state_dict(s1.state_dict())
    opt2.param_groups[0]["lr"] = s2.get_last_lr()[0]
    assert lr_sequence(s2, opt2, 25) == full[15:]


def test_refinement_errors():
    with pytest.raises(ValueError, match="norm_type"):
        refine_schedule([1.0, 2.0], "l3")
    with pytest.raises(ValueError, match="norm_type"):
        RefinedSchedule(_opt(), norms=[1.0, 2.0], total_steps=10)
    with pytest.raises(ValueError, match="at least 2"):
        refine_schedule([1.0], "l2")
    with pytest.raises(ValueError, match="> 0"):
        refinement_weights(torch.tensor([1.0, 0.0]), "l2")
    with pytest.raises(FileNotFoundError, match="ScheduleRefinement"):
        RefinedSchedule(_opt(), norms="/nonexistent/norms.json", total_steps=10)
    with pytest.raises(ValueError, match="smoothing_tau"):
        RefinedSchedule(_opt(), norms=[1.0, 2.0], norm_type="l2", total_steps=10, smoothing_tau=2.0)
    with pytest.raises(ValueError, match="total_steps"):
        online_profile([1.0, 2.0, 3.0], total_steps=2)


def _long_run_norms(steps: int, seed: int = 0) -> np.ndarray:
    """Norms with a short spike early on (1% of the run) and a slow rise, plus lognormal noise."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 1.0, steps)
    base = 1.0 + 0.5 * t + 4.0 * ((t > 0.30) & (t < 0.305))
    return base * rng.lognormal(sigma=0.2, size=steps)


@pytest.mark.parametrize("steps,norm_type", [(30_000, "l2"), (12_345, "l1"), (3_000, "l2"), (10_000, "l1")])
def test_refinement_equals_the_authors_pipeline_for_short_and_long_runs(steps, norm_type):
    from tests.reference.refinement_authors import refined_schedule_authors

    g = _long_run_norms(steps)
    ours = refine_schedule(g.tolist(), norm_type, tau=0.1, resample_points=10_000).numpy()
    ref = refined_schedule_authors(g, l1=norm_type == "l1")
    # Same float64 operations up to the order of the cumulative sums: 1e-9 absolute on a profile of peak 1.
    assert np.allclose(ours, ref, atol=1e-9, rtol=0)


def test_refinement_window_is_fixed_points_not_a_tenth_of_a_long_run():
    # 100k steps with a burst at 50%: the authors' 1,001-step window (1% of the run) removes a 300-step burst but
    # keeps a 3,000-step one; a window of 10% of the run (resampling to 10k points first) removes both.
    t = np.linspace(0.0, 1.0, 100_000)
    g = 1.0 + 2.0 * ((t > 0.5) & (t < 0.53))
    eta = refine_schedule(g.tolist(), "l2", tau=0.1, resample_points=10_000).numpy()
    lin = 1 - np.arange(10_000) / 9_999
    assert eta[5_100] < 0.5 * lin[5_100]  # the 3% burst (weight 1/9) pulls the rate down inside it
