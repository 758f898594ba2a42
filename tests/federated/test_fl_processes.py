"""The federated runner's Lightning-free pieces: argument checks, launch checks and what one server update reports."""

from __future__ import annotations

import math

import pytest

from lightning_convergence.federated import FedAvg, FedBuff
from lightning_convergence.federated.processes import check_fl_arguments, check_launch, server_step_metrics


def _args(**kw):
    base = dict(rule=FedBuff(buffer_size=2), num_clients=3, local_steps=2, speeds=None, participation_probs=None,
                seed=0, event_order=None, faults=None)
    base.update(kw)
    return check_fl_arguments("Runner", **base)


def test_arguments_are_normalised():
    checked = _args(speeds=[1, 2, 3], faults={"1": ["kill", "2"]}, event_order=[0, 1], round_timeout_s=5)
    assert checked.speeds == [1.0, 2.0, 3.0] and checked.event_order == [0, 1]
    assert checked.faults[1].kind == "kill" and checked.faults[1].after_updates == 2
    assert _args(rule=FedAvg(num_clients=3), participation_probs=[1, 0.5, 0.5]).participation.probs == [1.0, 0.5, 0.5]


@pytest.mark.parametrize(("kw", "error", "field"), [
    ({"num_clients": True}, TypeError, "num_clients"),  # a bool is not a count
    ({"local_steps": 2.0}, TypeError, "local_steps"),
    ({"speeds": [1, 2]}, ValueError, "speeds"),
    ({"speeds": [1, math.inf, 2]}, ValueError, "speeds"),
    ({"rule": "fedbuff"}, TypeError, "rule"),
    ({"participation_probs": [0.5] * 3}, ValueError, "participation_probs"),  # FedBuff is not round-based
    ({"rule": FedAvg(num_clients=3), "participation_probs": [0.5, 0.0, 1.0]}, ValueError, "participation_probs"),
    ({"rule": FedAvg(num_clients=3), "event_order": [0]}, ValueError, "event_order"),
    ({"faults": {0: ["explode", 1]}}, ValueError, "faults"),
    ({"serve_timeout_s": -1}, ValueError, "serve_timeout_s"),
])
def test_bad_arguments_name_class_and_field(kw, error, field):
    with pytest.raises(error, match=rf"^Runner: `{field}` must be "):
        _args(**kw)


def test_launch_checks():
    check_launch("Runner", num_clients=3, world=4, event_order=None)  # one client per client rank
    check_launch("Runner", num_clients=5, world=3, event_order=None)  # several clients per rank
    with pytest.raises(ValueError, match=r"`num_clients` must be >= 3, got 2\. This launch has 4 processes"):
        check_launch("Runner", num_clients=2, world=4, event_order=None)
    with pytest.raises(ValueError, match=r"`event_order` must be None when 5 clients share 2"):
        check_launch("Runner", num_clients=5, world=3, event_order=[0, 1])


def test_step_metrics_average_only_finite_client_losses():
    rule = FedBuff(buffer_size=2)
    loss, metrics = server_step_metrics(rule, {"clients_alive": 3.0}, [1.0, math.nan, 2.0])
    assert loss == 1.5 and metrics["client_loss"] == 1.5 and metrics["clients_alive"] == 3.0
    assert metrics["version"] == 0.0 and "updates_applied_total" in metrics
    loss, metrics = server_step_metrics(rule, {}, [math.inf])
    assert math.isnan(loss) and "client_loss" not in metrics
