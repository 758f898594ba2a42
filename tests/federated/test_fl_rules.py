"""Server-rule cores vs hand-computed values, exactly-once bookkeeping, state round-trips and error messages."""

from __future__ import annotations

import io
import math

import pytest
import torch

from lightning_convergence.federated import (
    FedAsync,
    FedAU,
    FedAvg,
    FedBuff,
    FedFix,
    FedProx,
    add_proximal_grad,
    proximal_term,
    staleness_weight,
)
from tests.reference.fedau_authors import fedau_authors
from tests.reference.fedbuff_flsim import fedbuff_flsim


def _d(x: float, y: float = 0.0) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor([x]), "b": torch.tensor([y])}


def _init(rule, x: float = 0.0):
    rule.init_params(_d(x))
    return rule


def test_staleness_functions_hand_values():
    assert staleness_weight(7, "constant") == 1.0
    assert staleness_weight(3, "polynomial", a=0.5) == pytest.approx(0.5)  # (3+1)^-0.5
    assert staleness_weight(4, "hinge", a=10, b=4) == 1.0
    assert staleness_weight(6, "hinge", a=10, b=4) == pytest.approx(1 / 21)  # 1/(10·2+1)
    with pytest.raises(ValueError, match="kind"):
        staleness_weight(1, "cosine")


def test_fedavg_weighted_round_and_stale_rejection():
    rule = _init(FedAvg(num_clients=2, client_weights=[1, 3], server_lr=1.0))
    assert rule.receive(0, _d(4.0), base_version=0)
    assert rule.version == 0 and rule.pending == 1
    assert rule.receive(1, _d(8.0), base_version=0)
    assert rule.params["w"].item() == pytest.approx(0.25 * 4 + 0.75 * 8)
    assert rule.version == 1 and rule.counters["updates_applied_total"] == 2
    assert not rule.receive(0, _d(1.0), base_version=0)  # from the finished round: rejected, counted
    assert rule.counters["stale_rejected_total"] == 1
    rule.begin_round([0])
    assert rule.receive(0, _d(1.0), base_version=1) and rule.version == 2  # round of one participant


def test_fedavg_close_round_after_timeout_averages_who_reported():
    rule = _init(FedAvg(num_clients=3))
    rule.receive(2, _d(6.0), 0)
    assert rule.close_round() and rule.params["w"].item() == pytest.approx(6.0)
    assert not rule.close_round()  # nothing arrived: model unchanged


def test_duplicates_and_nonfinite_are_rejected_and_counted():
    rule = _init(FedBuff(buffer_size=100, staleness="constant"))
    assert rule.receive(0, _d(1.0), 0, update_seq=5)
    assert not rule.receive(0, _d(1.0), 0, update_seq=5)
    assert not rule.receive(0, _d(1.0), 0, update_seq=3)
    assert not rule.receive(1, _d(float("nan")), 0, update_seq=0)
    assert not rule.receive(1, _d(1.0, float("inf")), 0, update_seq=1)
    c = rule.counters
    assert (c["duplicate_skipped_total"], c["nonfinite_skipped_total"], c["updates_accepted_total"]) == (2, 2, 1)
    assert torch.isfinite(rule.buffer["w"]).all()


def test_fedbuff_mean_staleness_and_momentum_by_hand():
    rule = _init(FedBuff(buffer_size=2, server_lr=0.5, staleness="polynomial", staleness_a=1.0, server_momentum=0.5))
    rule.receive(0, _d(2.0), 0)
    rule.receive(1, _d(4.0), 0)
    # step = (2 + 4)/2 = 3; m = 3; w = 0.5·3 = 1.5
    assert rule.params["w"].item() == pytest.approx(1.5) and rule.version == 1
    rule.receive(0, _d(2.0), 0)  # staleness 1: s = 1/2 -> contributes 1
    rule.receive(1, _d(3.0), 1)  # staleness 0 -> 3
    # step = (1 + 3)/2 = 2; m = 0.5·3 + 2 = 3.5; w = 1.5 + 0.5·3.5 = 3.25
    assert rule.params["w"].item() == pytest.approx(3.25)
    assert rule.metrics()["staleness_steps"] == pytest.approx(0.25)


def test_fedbuff_with_k_equal_clients_equals_fedavg():
    """Equally fast clients, one update each per buffer: FedBuff(K=N, constant, mean) == synchronous FedAvg."""
    g = torch.Generator().manual_seed(0)
    buff, avg = _init(FedBuff(buffer_size=3, staleness="constant")), _init(FedAvg(num_clients=3))
    for _ in range(4):
        deltas = [_d(*torch.randn(2, generator=g).tolist()) for _ in range(3)]
        for i, d in enumerate(deltas):
            buff.receive(i, d, buff.version)
            avg.receive(i, d, avg.version)
    assert torch.allclose(buff.params["w"], avg.params["w"]) and buff.version == avg.version == 4


def test_fedasync_model_mixing_uses_the_downloaded_model():
    rule = _init(FedAsync(alpha=0.5, staleness="polynomial", staleness_a=1.0))
    rule.dispatch(0)  # client 0 holds x_0 = 0
    rule.dispatch(1)
    rule.receive(1, _d(2.0), 0)  # x = 0.5·0 + 0.5·(0 + 2) = 1
    rule.receive(0, _d(4.0), 0)  # staleness 1: α_t = 0.25; x = 0.75·1 + 0.25·(0 + 4) = 1.75
    assert rule.params["w"].item() == pytest.approx(1.75)
    assert rule.version == 2
    delta_rule = _init(FedAsync(alpha=0.5, staleness="polynomial", staleness_a=1.0, mixing="delta"))
    delta_rule.receive(1, _d(2.0), 0)
    delta_rule.receive(0, _d(4.0), 0)  # x = 1 + 0.25·4 = 2
    assert delta_rule.params["w"].item() == pytest.approx(2.0)


def test_fedasync_history_keeps_only_held_versions():
    rule = _init(FedAsync(alpha=0.5, staleness="constant"))
    for step in range(5):
        rule.dispatch(0)
        rule.receive(0, _d(1.0), step)
    rule.dispatch(0)
    assert set(rule.history) == {5}


def test_fedfix_window_weights_by_hand():
    rule = _init(FedFix(period=1.0, num_clients=2))
    rule.receive(0, _d(2.0), base_version=0, now=0.4)  # fast client, inside window 0
    assert rule.advance(1.0) == 1  # boundary at 1.0: θ = 0.5·2 = 1 (d_0 = 1·½)
    assert rule.params["w"].item() == pytest.approx(1.0) and rule.version == 1
    rule.receive(1, _d(4.0), base_version=0, now=1.7)  # slow client spanned windows 0 and 1: d = 2·½ = 1
    assert rule.advance(2.5) == 1
    assert rule.params["w"].item() == pytest.approx(1.0 + 4.0) and rule.staleness_hist == {0: 1, 1: 1}
    assert rule.advance(4.0) == 2 and rule.version == 4  # empty windows still advance the window counter


def test_fedau_weights_converge_to_inverse_participation():
    rule = FedAU(num_clients=2, cutoff_rounds=100)
    g = torch.Generator().manual_seed(1)
    for _ in range(4000):
        part = [n for n, p in enumerate((0.8, 0.2)) if torch.rand((), generator=g).item() < p]
        rule.update_weights(part)
    # 4000 rounds: mean interval of a geometric(p) variable, standard error ≲ 3% of 1/p -> 10% tolerance.
    assert rule.omega[0] == pytest.approx(1 / 0.8, rel=0.1)
    assert rule.omega[1] == pytest.approx(1 / 0.2, rel=0.1)


def test_fedau_cutoff_and_update_by_hand():
    rule = _init(FedAU(num_clients=2, cutoff_rounds=3))
    for _ in range(3):
        rule.begin_round([0])
        rule.receive(0, _d(1.0), rule.version)
    assert rule.omega == [1.0, 3.0]  # client 1 never came: interval closed at the cutoff K=3
    rule.begin_round([1])
    rule.receive(1, _d(2.0), rule.version)  # weighted by ω_1 = 3 (closed before); then ω_1 = (3 + 1)/2 = 2
    assert rule.omega[1] == pytest.approx(2.0)
    # Rounds 1-3: client 0 with ω_0 = 1 (no interval closed before round 1, then intervals of 1): 3·½·1;
    # round 4: client 1 with ω_1 = 3: ½·3·2.
    assert rule.params["w"].item() == pytest.approx(3 * 0.5 + 0.5 * 3.0 * 2.0)


def test_fedau_client_first_seen_in_round_5_gets_weight_1_as_in_the_authors_code():
    """Hand case of the authors' timing: the interval a participation closes is used from the next round on."""
    rule = _init(FedAU(num_clients=2, cutoff_rounds=50))
    for _ in range(4):
        rule.begin_round([0])
        rule.receive(0, _d(0.0), rule.version)
    rule.begin_round([1])
    rule.receive(1, _d(2.0), rule.version)
    # ½·ω_1·2 with ω_1 = 1 (the authors' code leaves the delta unscaled); weighting by this round's interval
    # (5 rounds) would give 5.
    assert rule.params["w"].item() == pytest.approx(1.0)
    assert rule.omega[1] == pytest.approx(5.0)  # the interval closed this round counts from the next round


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fedau_equals_the_authors_loop_on_random_participation(seed):
    """60 rounds, 5 clients with different Bernoulli rates, cutoff K=4: same model and weights as the transcription
    of IBM/fedau's ``adaptive`` loop (tests/reference/fedau_authors.py)."""
    g = torch.Generator().manual_seed(seed)
    probs, n_clients, k_value = (0.9, 0.5, 0.2, 0.05, 0.3), 5, 4
    rounds = []
    for _ in range(60):
        part = [n for n, p in enumerate(probs) if torch.rand((), generator=g).item() < p]
        rounds.append({n: torch.randn(2, generator=g) for n in part})
    x_ref, weights_ref = fedau_authors(torch.zeros(2), rounds, n_clients, k_value, step_size_global=0.5)
    rule = FedAU(num_clients=n_clients, cutoff_rounds=k_value, server_lr=0.5)
    rule.init_params({"w": torch.zeros(2)})
    for r, deltas in enumerate(rounds):
        used = [rule.omega[n] if n in deltas else None for n in range(n_clients)]
        assert used == pytest.approx(weights_ref[r])  # ω read before the round, as the authors' code does
        rule.begin_round(list(deltas))
        for n, d in sorted(deltas.items()):
            rule.receive(n, {"w": d}, rule.version)
        if not deltas:
            rule.close_round()
    # Same sums in the same order up to the association of ω·Δ/N: float32 rounding only.
    assert torch.allclose(rule.params["w"], x_ref, atol=1e-5)


def test_fedprox_term_and_gradient():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    g = {"w": torch.tensor([0.0, 0.0])}
    assert proximal_term([("w", w)], g, mu=0.1).item() == pytest.approx(0.05 * 5)
    w.grad = torch.zeros(2)
    add_proximal_grad([("w", w)], g, mu=0.1)
    assert torch.allclose(w.grad, torch.tensor([0.1, 0.2]))
    assert FedProx(num_clients=2, mu=0.1).prox_mu == 0.1


@pytest.mark.parametrize("make", [
    lambda: FedBuff(buffer_size=3, staleness="hinge", staleness_a=1.0, server_momentum=0.9),
    lambda: FedAsync(alpha=0.7),
    lambda: FedFix(period=1.0, num_clients=3),
    lambda: FedAU(num_clients=3, cutoff_rounds=4),
    lambda: FedAvg(num_clients=3),
])
def test_resume_mid_buffer_equals_straight_run(make):
    """Save mid-run (with pending updates), reload through torch.load(weights_only=True): same end state."""
    g = torch.Generator().manual_seed(0)
    events = [(i % 3, torch.randn(2, generator=g).tolist(), 0.3 * i) for i in range(14)]

    def drive(rule, evs):
        for cid, (x, y), t in evs:
            if rule.synchronous and not isinstance(rule, FedFix):
                base = rule.version
            else:
                base = rule.outstanding.get(cid, rule.version)
            rule.receive(cid, _d(x, y), base, now=t)
            rule.dispatch(cid)
        return rule

    def fresh():
        rule = _init(make())
        for cid in range(3):
            rule.dispatch(cid)
        return rule

    straight = drive(fresh(), events)
    first = drive(fresh(), events[:7])
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = make()
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    drive(resumed, events[7:])
    assert resumed.version == straight.version and resumed.counters == straight.counters
    for k in straight.params:
        assert torch.equal(resumed.params[k], straight.params[k])
    assert resumed.counters["updates_accepted_total"] == resumed.counters["updates_applied_total"] + resumed.pending


@pytest.mark.parametrize("make, field", [
    (lambda: FedBuff(buffer_size=0), "buffer_size"),
    (lambda: FedBuff(server_momentum=1.0), "server_momentum"),
    (lambda: FedBuff(reduction="max"), "reduction"),
    (lambda: FedBuff(staleness="exp"), "staleness"),
    (lambda: FedBuff(server_lr=0), "server_lr"),
    (lambda: FedAsync(alpha=1.5), "alpha"),
    (lambda: FedAsync(mixing="avg"), "mixing"),
    (lambda: FedAsync(prox_mu=-1), "prox_mu"),
    (lambda: FedFix(period=0, num_clients=2), "period"),
    (lambda: FedAvg(num_clients=0), "num_clients"),
    (lambda: FedAvg(num_clients=2, client_weights=[1, -1]), "client_weights"),
    (lambda: FedAU(num_clients=2, cutoff_rounds=0), "cutoff_rounds"),
    (lambda: FedProx(num_clients=2, mu=-0.1), "mu"),
    (lambda: FedBuff(max_staleness=-1), "max_staleness"),
])
def test_errors_name_the_field(make, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        make()


def test_receive_errors():
    rule = FedBuff()
    with pytest.raises(RuntimeError, match="init_params"):
        rule.receive(0, _d(1.0), 0)
    _init(rule)
    with pytest.raises(ValueError, match="base_version"):
        rule.receive(0, _d(1.0), 3)
    with pytest.raises(ValueError, match="delta"):
        rule.receive(1, {"w": torch.ones(1)}, 0)
    with pytest.raises(ValueError, match="shape"):
        rule.receive(2, {"w": torch.ones(2), "b": torch.ones(1)}, 0)
    with pytest.raises(ValueError, match="participants"):
        FedAvg(num_clients=2).begin_round([5])
    assert math.isfinite(rule.metrics()["staleness_steps"])


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_fedbuff_sum_equals_flsims_hybrid_aggregator(momentum):
    """FLSim (the authors' group's code) sums the buffered deltas (no 1/K) and steps torch's SGD: reduction='sum'."""
    g = torch.Generator().manual_seed(3)
    reports = [torch.randn(3, generator=g) for _ in range(12)]
    ref = fedbuff_flsim(torch.zeros(3), reports, buffer_size=4, lr=0.7, momentum=momentum)
    rule = FedBuff(buffer_size=4, server_lr=0.7, staleness="constant", server_momentum=momentum, reduction="sum")
    rule.init_params({"w": torch.zeros(3)})
    for k, d in enumerate(reports):
        rule.receive(k % 5, {"w": d}, rule.version)
    # torch's SGD folds lr into a different product order: float32 rounding on values of size ~1.
    assert torch.allclose(rule.params["w"], ref, atol=1e-5)
    mean = FedBuff(buffer_size=4, server_lr=0.7, staleness="constant", server_momentum=momentum)
    mean.init_params({"w": torch.zeros(3)})
    for k, d in enumerate(reports):
        mean.receive(k % 5, {"w": d}, mean.version)
    assert torch.allclose(mean.params["w"], ref / 4, atol=1e-5)  # 'mean' is the same run with η_g/K
