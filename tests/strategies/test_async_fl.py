"""AsyncFederatedStrategy with real forked gloo clients: faults, real == simulation, resume, logging, errors."""

from __future__ import annotations

import time

import pytest
import torch
from lightning.pytorch import Trainer

from lightning_convergence.data import FederatedDataModule
from lightning_convergence.examples import LinearModel, SyntheticRegressionDataModule
from lightning_convergence.federated import (
    ClientStream,
    FedAsync,
    FedAU,
    FedAvg,
    FedBuff,
    FederatedSimulation,
    FedFix,
    Participation,
)
from lightning_convergence.strategies.async_fl import AsyncFederatedStrategy
from tests.helpers.loggers import MemoryLogger

pytestmark = [pytest.mark.timeout(60), pytest.mark.filterwarnings("ignore:.*self.log.*")]

DIM, BATCH, K = 5, 8, 2


def _data(num_clients: int, partition: str = "iid") -> FederatedDataModule:
    return FederatedDataModule(SyntheticRegressionDataModule(n_samples=128, dim=DIM, batch_size=BATCH),
                               num_clients=num_clients, partition=partition, seed=0)


def _fit(strategy, max_steps: int, data=None, logger=None, ckpt_path=None, **kw):
    trainer = Trainer(strategy=strategy, max_steps=max_steps, accelerator="cpu", devices=1, logger=logger or False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, log_every_n_steps=1, **kw)
    model = LinearModel(dim=DIM, lr=0.05)
    trainer.fit(model, data or _data(strategy.num_clients), ckpt_path=ckpt_path)
    return trainer, model


def _sim_streams(num_clients: int) -> list[ClientStream]:
    dm = _data(num_clients)
    dm.setup("fit")
    return [ClientStream(*dm.client_dataset(c), BATCH, seed=0, client_id=c) for c in range(num_clients)]


def test_crashed_and_stalled_clients_never_block_and_updates_are_accounted():
    strategy = AsyncFederatedStrategy(rule=FedBuff(buffer_size=2, staleness="polynomial"), num_clients=3,
                                      local_steps=K, faults={1: ["crash", 2], 2: ["stall", 1]},
                                      shutdown_timeout_s=1.0)
    start = time.monotonic()
    trainer, model = _fit(strategy, max_steps=12)
    assert time.monotonic() - start < 40  # bounded: nobody waited for the stalled or the dead client
    rule = strategy.rule
    c = rule.counters
    assert rule.version == 12 and trainer.global_step == 12
    assert c["updates_applied_total"] == 24  # 12 buffers of 2, each update applied exactly once
    assert c["updates_accepted_total"] == c["updates_applied_total"] + rule.pending
    assert c["duplicate_skipped_total"] == 0 and sum(rule.participation.values()) == c["updates_accepted_total"]
    assert rule.participation[1] == 2 and rule.participation[2] == 1  # the crashed/stalled clients' updates counted
    assert 2 in strategy.stuck_clients
    assert torch.equal(model.linear.weight.detach().reshape(-1), rule.params["linear.weight"].reshape(-1))


@pytest.mark.parametrize("make_rule", [
    lambda: FedAsync(alpha=0.6, staleness="polynomial", staleness_a=0.5),
    lambda: FedBuff(buffer_size=2, staleness="hinge", staleness_a=1.0, staleness_b=1, server_momentum=0.5),
])
def test_real_processes_match_simulation_for_a_forced_event_order(make_rule):
    order = [0, 1, 0, 2, 0, 1, 0, 0, 2, 1]
    sim_rule = make_rule()
    FederatedSimulation(LinearModel(dim=DIM, lr=0.05), sim_rule, _sim_streams(3), local_steps=K).run(
        event_order=order)
    strategy = AsyncFederatedStrategy(rule=make_rule(), num_clients=3, local_steps=K, event_order=order,
                                      shutdown_timeout_s=2.0)
    _fit(strategy, max_steps=sim_rule.version)
    assert strategy.rule.version == sim_rule.version
    # Same arithmetic in separate processes (one thread each) vs in-process: identical up to float32 rounding.
    assert torch.allclose(strategy.rule.params["linear.weight"], sim_rule.params["linear.weight"], atol=1e-6)
    assert strategy.rule.staleness_hist == sim_rule.staleness_hist


def test_synchronous_fedavg_real_equals_simulation():
    sim_rule = FedAvg(num_clients=3)
    FederatedSimulation(LinearModel(dim=DIM, lr=0.05), sim_rule, _sim_streams(3), local_steps=K).run(max_versions=4)
    strategy = AsyncFederatedStrategy(rule=FedAvg(num_clients=3), num_clients=3, local_steps=K)
    _fit(strategy, max_steps=4)
    assert torch.allclose(strategy.rule.params["linear.weight"], sim_rule.params["linear.weight"], atol=1e-6)


def test_fedau_with_participation_and_fedfix_run_on_real_processes():
    au = AsyncFederatedStrategy(rule=FedAU(num_clients=3, cutoff_rounds=5), num_clients=3, local_steps=K,
                                participation_probs=[1.0, 0.5, 0.5], seed=3)
    _fit(au, max_steps=4)
    expected = Participation(probs=[1.0, 0.5, 0.5], seed=3)
    assert au.rule.participation[0] >= 4 and au.rule.rounds_total >= 4
    assert sum(1 for r in range(au.rule.rounds_total) for c in expected.participants(r) if c == 1) == \
        au.rule.participation.get(1, 0)
    fix = AsyncFederatedStrategy(rule=FedFix(period=0.2, num_clients=2), num_clients=2, local_steps=K)
    _fit(fix, max_steps=3)
    assert fix.rule.version == 3


def test_resume_continues_from_the_same_version(tmp_path):
    def strategy():
        return AsyncFederatedStrategy(rule=FedAvg(num_clients=2), num_clients=2, local_steps=K)

    straight = strategy()
    _fit(straight, max_steps=4)
    first = strategy()
    trainer, _ = _fit(first, max_steps=2)
    ckpt = tmp_path / "half.ckpt"
    trainer.save_checkpoint(ckpt)
    assert torch.load(ckpt, weights_only=True)["convergence/fl"]["rule"]["model_version"] == 2
    resumed = strategy()
    _fit(resumed, max_steps=4, ckpt_path=str(ckpt))
    assert resumed.rule.version == 4 and resumed.rule.counters == straight.rule.counters
    assert torch.equal(resumed.rule.params["linear.weight"], straight.rule.params["linear.weight"])


def test_async_resume_keeps_version_counters_and_pending_buffer(tmp_path):
    def strategy():
        return AsyncFederatedStrategy(rule=FedBuff(buffer_size=3), num_clients=2, local_steps=1, event_order=None)

    first = strategy()
    trainer, _ = _fit(first, max_steps=3)
    ckpt = tmp_path / "async.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)["convergence/fl"]["rule"]
    assert saved["model_version"] == 3 and saved["extra"]["count"] == first.rule.count
    resumed = strategy()
    _fit(resumed, max_steps=5, ckpt_path=str(ckpt))
    c, c0 = resumed.rule.counters, saved["counters"]
    assert resumed.rule.version == 5 and c["updates_applied_total"] == 15  # 5 buffers of 3, pending ones included
    assert c["updates_accepted_total"] >= c0["updates_accepted_total"] + 6 - first.rule.count
    assert c["updates_accepted_total"] == c["updates_applied_total"] + resumed.rule.pending
    assert resumed.rule.last_seq[0] >= saved["last_seq"][0]  # update numbering continues: no seq is reused


def test_logs_fl_metrics_from_the_server():
    logger = MemoryLogger()
    strategy = AsyncFederatedStrategy(rule=FedBuff(buffer_size=1), num_clients=2, local_steps=1, log_per_item=True)
    _fit(strategy, max_steps=3, logger=logger)
    assert logger.values("convergence/fl/updates_applied_total")[-1] == 3
    assert logger.values("convergence/fl/staleness_steps")
    assert logger.values("convergence/fl/participation/client0")
    assert any(k.startswith("convergence/fl/staleness_count/") for _, m in logger.history for k in m)


@pytest.mark.parametrize("kwargs, field", [
    ({"num_clients": 0}, "num_clients"),
    ({"local_steps": 0}, "local_steps"),
    ({"speeds": [1.0]}, "speeds"),
    ({"step_delay_s": -1.0}, "step_delay_s"),
    ({"participation_probs": [0.5] * 4}, "participation_probs"),
    ({"rule": FedAvg(num_clients=4), "event_order": [0, 1]}, "event_order"),
    ({"faults": {0: ["explode", 1]}}, "faults"),
])
def test_strategy_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        AsyncFederatedStrategy(**kwargs)


def test_rule_type_and_datamodule_checks():
    with pytest.raises(TypeError, match="rule"):
        AsyncFederatedStrategy(rule="fedbuff")
    with pytest.raises(ValueError, match="partition"):
        FederatedDataModule(SyntheticRegressionDataModule(), partition="shards")
    strategy = AsyncFederatedStrategy(num_clients=2)
    with pytest.raises(TypeError, match="client_dataset"):
        Trainer(strategy=strategy, max_steps=1, accelerator="cpu", devices=1, logger=False,
                enable_progress_bar=False, enable_model_summary=False).fit(
            LinearModel(dim=10), SyntheticRegressionDataModule())


@pytest.mark.parametrize("fault, expected_applied", [
    (["crash", 1], 3 + 2 + 2),  # round 1: everyone; later rounds: the dead client is detected and left out
    (["stall", 1], 3 + 2 + 2),  # round 2 closes at round_timeout_s without it; round 3 skips the busy client
])
def test_synchronous_rounds_survive_a_crashed_or_stalled_client(fault, expected_applied):
    strategy = AsyncFederatedStrategy(rule=FedAvg(num_clients=3), num_clients=3, local_steps=1,
                                      faults={2: fault}, round_timeout_s=1.0, shutdown_timeout_s=1.0)
    start = time.monotonic()
    _fit(strategy, max_steps=3)
    assert time.monotonic() - start < 30
    rule = strategy.rule
    assert rule.version == 3 and rule.counters["updates_applied_total"] == expected_applied
    assert rule.participation[2] == 1 and rule.pending == 0


def test_one_client_one_local_step_fedavg_on_real_processes_is_plain_sgd():
    strategy = AsyncFederatedStrategy(rule=FedAvg(num_clients=1), num_clients=1, local_steps=1)
    _fit(strategy, max_steps=6)
    (stream,) = _sim_streams(1)
    ref = LinearModel(dim=DIM, lr=0.05)
    opt = ref.configure_optimizers()
    for step in range(6):
        opt.zero_grad()
        ref.training_step(stream.next_batch(), step).backward()
        opt.step()
    # x + (w_local − x) may round differently from w_local in float32: 1e-6 absolute on O(1) weights.
    assert torch.allclose(strategy.rule.params["linear.weight"], ref.linear.weight.detach(), atol=1e-6)
    assert strategy.rule.params["linear.weight"].abs().sum() > 0


def test_round_rule_waits_for_a_straggler_instead_of_spinning_empty_rounds():
    strategy = AsyncFederatedStrategy(rule=FedAU(num_clients=1), num_clients=1, local_steps=1,
                                      faults={0: ["stall", 1]}, round_timeout_s=0.3, serve_timeout_s=1.5,
                                      shutdown_timeout_s=0.5)
    start = time.monotonic()
    with pytest.warns(UserWarning, match="no server update possible"):
        trainer, _ = _fit(strategy, max_steps=5)
    assert time.monotonic() - start < 30 and trainer.should_stop
    assert strategy.rule.version == 1 and strategy.rule.rounds_total == 2  # round 1, then one timed-out round
