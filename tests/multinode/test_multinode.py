"""Real torchrun launches on 127.0.0.1: two "nodes" for every registered strategy, async FL over launched ranks,
a killed client rank, and elastic restarts that resume to the uninterrupted run's weights.

Each launch starts fresh Python processes (``import lightning`` ≈ 5 s each on 2 cores), so the runs are few and
tiny: a 10-parameter least-squares model, a few dozen steps. Equality is bitwise (``torch.equal``): the same seed,
world size and rank order give the same gloo reductions in the same order, whatever the launch shape.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.strategies import StrategyRegistry

import lightning_convergence  # noqa: F401  (registers the strategy names)
from lightning_convergence.strategies.compressed_ddp import CompressedDDPStrategy
from lightning_convergence.strategies.local_sgd import LocalSGDStrategy
from tests.multinode.launch import WORKER, run_fake_srun, run_nodes, run_plain, run_standalone

pytestmark = [pytest.mark.timeout(600), pytest.mark.skipif(sys.platform != "linux", reason="torchrun on Linux")]


def _registered(cls: type) -> list[str]:
    return sorted(n for n, e in StrategyRegistry.items() if e["strategy"] is cls)


DDP_FAMILY = ["ddp", *_registered(CompressedDDPStrategy)]
LOCAL_SGD_FAMILY = _registered(LocalSGDStrategy)


def _ok(results) -> None:
    for r in results:
        assert r.returncode == 0 and not r.timed_out, r.log[-4000:]


def _params(directory: Path, name: str, rank: int) -> dict[str, torch.Tensor]:
    return torch.load(directory / name / f"rank{rank}.pt", weights_only=True)["params"]


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


STEPS = 40  # past DiLoCo's first outer step (32) and five local-SGD syncs (every 8)


def _fit_args(names: list[str]) -> list[str]:
    return [str(WORKER), "fit", "--strategies", ",".join(names), "--steps", str(STEPS)]


@pytest.fixture(scope="module")
def one_node_two_processes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("1x2")
    names = DDP_FAMILY + LOCAL_SGD_FAMILY
    _ok([run_standalone([*_fit_args(names), "--out", str(out), "--devices", "2"], 2, out, timeout_s=300)])
    return out


def test_every_registered_ddp_and_local_sgd_strategy_is_identical_on_2_nodes_and_1_node(tmp_path,
                                                                                       one_node_two_processes):
    names = DDP_FAMILY + LOCAL_SGD_FAMILY
    assert {"ddp_ef21", "local_sgd", "diloco"} <= set(names)
    _ok(run_nodes([*_fit_args(names), "--out", str(tmp_path), "--num-nodes", "2"], [1, 1], tmp_path, timeout_s=300))
    for name in names:
        for rank in (0, 1):
            assert _equal(_params(tmp_path, name, rank), _params(one_node_two_processes, name, rank)), (name, rank)
        assert torch.load(tmp_path / name / "rank0.pt", weights_only=True)["global_step"] == STEPS
    for name in DDP_FAMILY:  # really one job of two ranks: the DDP replicas agree after every step
        assert _equal(_params(tmp_path, name, 0), _params(tmp_path, name, 1)), name


def test_slurm_tasks_give_the_same_weights_and_run_async_fl(tmp_path, one_node_two_processes):
    # Two processes started as srun starts two tasks on one node (SLURM_* variables, no torchrun).
    names = ["ddp_ef21", "local_sgd"]
    _ok(run_fake_srun([*_fit_args(names), "--out", str(tmp_path), "--devices", "2"], 2, tmp_path, timeout_s=300))
    for name in names:
        for rank in (0, 1):
            assert _equal(_params(tmp_path, name, rank), _params(one_node_two_processes, name, rank)), (name, rank)
    _ok(run_fake_srun([str(WORKER), "async", "--out", str(tmp_path), "--devices", "2", "--clients", "1", "--steps",
                       "3"], 2, tmp_path, timeout_s=300))
    result = _async_result(tmp_path)
    assert result["version"] == 3 and result["participation"] == {0: 6}
    _check_applied_once(result, buffer_size=2)


def _async_result(tmp_path: Path) -> dict:
    return torch.load(tmp_path / "async.pt", weights_only=False)


def _check_applied_once(result: dict, buffer_size: int) -> None:
    """Hand computation of FedBuff with constant staleness weight and mean reduction: the final model is the initial
    one plus (1/K)·Σ of the first ``version·K`` accepted deltas (every accepted update applied exactly once)."""
    accepted = [o for o in result["offered"] if o["accepted"]]
    keys = [(o["client"], o["seq"]) for o in accepted]
    assert len(keys) == len(set(keys))  # no (client, update) accepted twice
    counters, version = result["counters"], result["version"]
    assert counters["updates_applied_total"] == version * buffer_size
    assert counters["updates_accepted_total"] == counters["updates_applied_total"] + result["pending"]
    expected = {k: v.clone() for k, v in result["init"].items()}
    for o in accepted[: version * buffer_size]:
        for k in expected:
            expected[k] += o["delta"][k] / buffer_size
    for k, v in expected.items():
        # float32 sums of ≤ 20 deltas in another order than the rule's buffer: rounding only
        torch.testing.assert_close(result["final"][k], v, atol=1e-5, rtol=1e-5)
        assert torch.equal(result["final"][k], result["rule_params"][k])


def test_async_fl_server_on_one_node_serves_three_clients_on_the_other(tmp_path):
    steps, buffer_size = 6, 2
    results = run_nodes([str(WORKER), "async", "--out", str(tmp_path), "--num-nodes", "2", "--clients", "3",
                         "--steps", str(steps), "--buffer", str(buffer_size)], [1, 1], tmp_path, timeout_s=300)
    _ok(results)
    result = _async_result(tmp_path)
    assert result["version"] == steps and result["global_step"] == steps and not result["deaths"]
    assert set(result["participation"]) == {0, 1, 2}  # one client rank served all three clients in turn
    _check_applied_once(result, buffer_size)
    sent = torch.load(tmp_path / "client_rank1.pt", weights_only=True)["updates_sent"]
    assert sent >= result["counters"]["updates_received_total"]  # the rank's updates all reached the server


def test_async_fl_under_lightnings_own_launcher_one_node_two_processes(tmp_path):
    # No torchrun: Trainer(devices=2) re-runs the script with LOCAL_RANK=1, and that process is the client rank.
    _ok([run_plain([str(WORKER), "async", "--out", str(tmp_path), "--devices", "2", "--clients", "2", "--steps", "3"],
                   tmp_path, timeout_s=300)])
    result = _async_result(tmp_path)
    assert result["version"] == 3 and set(result["participation"]) == {0, 1} and not result["deaths"]
    _check_applied_once(result, buffer_size=2)
    assert torch.load(tmp_path / "client_rank1.pt", weights_only=True)["updates_sent"] >= 6


def test_killed_and_stalled_client_ranks_never_block_the_server_and_their_updates_count_once(tmp_path):
    steps, buffer_size = 8, 2
    # Four nodes: the server, client 0 (rank 1), client 1 (rank 2, SIGKILLed after its 2nd update) and client 2
    # (rank 3, asleep for an hour after its 1st update). The surviving agents would wait 300 s in torchrun's exit
    # barrier for the failed one, and the stalled rank never ends: stop the launch once the server and client 0 have
    # written their results.
    def finished() -> bool:
        return (tmp_path / "async.pt").exists() and (tmp_path / "client_rank1.pt").exists()

    results = run_nodes([str(WORKER), "async", "--out", str(tmp_path), "--clients", "3", "--steps", str(steps),
                         "--buffer", str(buffer_size), "--faults", "1:kill:2,2:stall:1"], [1, 1, 1, 1], tmp_path,
                        timeout_s=300, done=finished)
    assert finished(), [r.log[-3000:] for r in results]
    killed = [r for r in results if "Signal 9 (SIGKILL) received" in r.log]
    assert len(killed) == 1 and killed[0].returncode != 0  # the client's node reports its dead worker
    result = _async_result(tmp_path)
    assert result["version"] == steps and result["global_step"] == steps  # the server finished its run
    assert list(result["deaths"]) == [1] and result["stalled"] == [2]  # the report names who dropped
    assert result["participation"][1] == 2 and result["participation"][2] == 1  # accepted, once each
    _check_applied_once(result, buffer_size)
    server_log = next(r.log for r in results if "is the server" in r.log)
    assert "clients lost: 1 (rank 2" in server_log and "(stalled): [3]" in server_log


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    _ok([run_standalone([str(WORKER), "resume", "--out", str(out), "--devices", "2", "--strategies",
                         "ddp_ef21,local_sgd", "--ckpt-dir", str(out / "ckpt"), "--epochs", "3"], 2, out,
                        timeout_s=300)])
    return out


@pytest.mark.parametrize("name", ["ddp_ef21", "local_sgd"])
def test_elastic_restart_after_a_killed_rank_resumes_to_the_uninterrupted_weights(name, tmp_path, uninterrupted):
    # 15 steps per epoch and rank; checkpoints at steps 15 and 30 (epoch ends); rank 1 is SIGKILLed at step 36 of the
    # first attempt, torchrun restarts both ranks, and fit(ckpt_path="last") resumes from step 30. Step 30 is not a
    # local-SGD sync step (every 8), so the replicas differ there: each rank's own state must come back from the file.
    result = run_standalone([str(WORKER), "resume", "--out", str(tmp_path), "--devices", "2", "--strategies", name,
                             "--ckpt-dir", str(tmp_path / "ckpt"), "--epochs", "3", "--kill-step", "36",
                             "--kill-rank", "1"], 2, tmp_path, timeout_s=300, max_restarts=1)
    _ok([result])
    assert "Signal 9 (SIGKILL)" in result.log or "exitcode: -9" in result.log  # the first attempt really died
    assert "Restoring states from the checkpoint path" in result.log
    for rank in (0, 1):
        resumed = torch.load(tmp_path / name / f"rank{rank}.pt", weights_only=True)
        assert resumed["global_step"] == 45
        assert _equal(resumed["params"], _params(uninterrupted, name, rank)), rank
    key = {"ddp_ef21": "convergence/compressed_ddp", "local_sgd": "convergence/local_sgd"}[name]
    saved = torch.load(tmp_path / "ckpt" / name / "last.ckpt", weights_only=True)[key]
    assert saved["world_size"] == 2 and len(saved["ranks"]) == 2  # per-rank state travels in rank 0's file
