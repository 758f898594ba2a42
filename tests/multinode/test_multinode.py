"""Real launches on 127.0.0.1: two torchrun "nodes" for every registered strategy and async FL, SLURM-style tasks,
Lightning's own launcher, a killed and a stalled client rank, and elastic restarts that resume to the uninterrupted
run's weights.

Each launch starts fresh Python processes (``import lightning`` ≈ 5 s each on 2 cores), so launches are few and each
process runs several modes in turn (``worker.py fit,resume`` / ``fit,async``): six launches, 18 worker processes in
all. Models are a 10-parameter least-squares problem and runs a few dozen steps. Equality is bitwise
(``torch.equal``): the same seed, world size and rank order give the same gloo reductions in the same order, whatever
the launch shape.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.strategies import StrategyRegistry

import lightning_convergence  # noqa: F401  (registers the strategy names)
from lightning_convergence.strategies.compressed_ddp import CompressedDDPStrategy
from lightning_convergence.strategies.local_sgd import LocalSGDStrategy
from tests.multinode.launch import WORKER, run_fake_srun, run_nodes, run_plain, run_standalone

pytestmark = [pytest.mark.timeout(300), pytest.mark.skipif(sys.platform != "linux", reason="torchrun on Linux")]


def _registered(cls: type) -> list[str]:
    return sorted(n for n, e in StrategyRegistry.items() if e["strategy"] is cls)


DDP_FAMILY = ["ddp", *_registered(CompressedDDPStrategy)]
LOCAL_SGD_FAMILY = _registered(LocalSGDStrategy)
FIT_NAMES = DDP_FAMILY + LOCAL_SGD_FAMILY
RESUMED = ["ddp_ef21", "local_sgd"]  # one strategy of each family
STEPS = 40  # past DiLoCo's first outer step (32) and five local-SGD syncs (every 8)
TIMEOUT_S = 150  # a launch takes 5-25 s on 2 idle cores; a hang fails well inside the module's 300 s


def _ok(results) -> None:
    for r in results:
        assert r.returncode == 0 and not r.timed_out, r.log[-4000:]


def _saved(directory: Path, mode: str, name: str, rank: int) -> dict:
    return torch.load(directory / mode / name / f"rank{rank}.pt", weights_only=True)


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _args(modes: str, out: Path, *extra: str) -> list[str]:
    return [str(WORKER), modes, "--out", str(out), *extra]


@pytest.fixture(scope="module")
def one_node_two_processes(tmp_path_factory) -> Path:
    """torchrun --standalone, 2 processes: every strategy's final weights, and the uninterrupted elastic recipe."""
    out = tmp_path_factory.mktemp("1x2")
    _ok([run_standalone(_args("fit,resume", out, "--devices", "2", "--strategies", ",".join(FIT_NAMES), "--steps",
                              str(STEPS), "--resume-strategies", ",".join(RESUMED), "--ckpt-dir", str(out / "ckpt"),
                              "--epochs", "3"), 2, out, timeout_s=TIMEOUT_S)])
    return out


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


def test_two_torchrun_nodes_match_one_node_for_every_strategy_then_serve_three_async_clients(
        tmp_path, one_node_two_processes):
    assert {"ddp_ef21", "local_sgd", "diloco"} <= set(FIT_NAMES)
    async_steps, buffer_size = 6, 2
    _ok(run_nodes(_args("fit,async", tmp_path, "--num-nodes", "2", "--strategies", ",".join(FIT_NAMES), "--steps",
                        str(STEPS), "--clients", "3", "--async-steps", str(async_steps), "--buffer", str(buffer_size)),
                  [1, 1], tmp_path, timeout_s=TIMEOUT_S))
    for name in FIT_NAMES:
        for rank in (0, 1):
            got, ref = _saved(tmp_path, "fit", name, rank), _saved(one_node_two_processes, "fit", name, rank)
            assert _equal(got["params"], ref["params"]), (name, rank)
        assert got["global_step"] == STEPS
    for name in DDP_FAMILY:  # really one job of two ranks: the DDP replicas agree after every step
        assert _equal(_saved(tmp_path, "fit", name, 0)["params"], _saved(tmp_path, "fit", name, 1)["params"]), name
    # Async FL in the same processes: the server on node 0, one client rank on node 1 serving three clients in turn.
    result = _async_result(tmp_path)
    assert result["version"] == async_steps and result["global_step"] == async_steps and not result["deaths"]
    assert set(result["participation"]) == {0, 1, 2}
    _check_applied_once(result, buffer_size)
    sent = torch.load(tmp_path / "client_rank1.pt", weights_only=True)["updates_sent"]
    assert sent >= result["counters"]["updates_received_total"]  # the rank's updates all reached the server


def test_slurm_tasks_give_the_same_weights_and_run_async_fl(tmp_path, one_node_two_processes):
    # Two processes started as srun starts two tasks on one node (SLURM_* variables, no torchrun).
    _ok(run_fake_srun(_args("fit,async", tmp_path, "--devices", "2", "--strategies", ",".join(RESUMED), "--steps",
                            str(STEPS), "--clients", "1", "--async-steps", "3"), 2, tmp_path, timeout_s=TIMEOUT_S))
    for name in RESUMED:
        for rank in (0, 1):
            got, ref = _saved(tmp_path, "fit", name, rank), _saved(one_node_two_processes, "fit", name, rank)
            assert _equal(got["params"], ref["params"]), (name, rank)
    result = _async_result(tmp_path)
    assert result["version"] == 3 and result["participation"] == {0: 6}
    _check_applied_once(result, buffer_size=2)


def test_async_fl_under_lightnings_own_launcher_one_node_two_processes(tmp_path):
    # No torchrun: Trainer(devices=2) re-runs the script with LOCAL_RANK=1, and that process is the client rank.
    _ok([run_plain(_args("async", tmp_path, "--devices", "2", "--clients", "2", "--async-steps", "3"), tmp_path,
                   timeout_s=TIMEOUT_S)])
    result = _async_result(tmp_path)
    assert result["version"] == 3 and set(result["participation"]) == {0, 1} and not result["deaths"]
    _check_applied_once(result, buffer_size=2)
    assert torch.load(tmp_path / "client_rank1.pt", weights_only=True)["updates_sent"] >= 6


def test_killed_and_stalled_client_ranks_never_block_the_server_and_their_updates_count_once(tmp_path):
    steps, buffer_size = 8, 2
    # Four SLURM-style tasks: the server, client 0 (rank 1), client 1 (rank 2, SIGKILLed after its 2nd update) and
    # client 2 (rank 3, asleep for an hour after its 1st update). The stalled rank never ends: stop the launch once
    # the server and client 0 have written their results.
    def finished() -> bool:
        return (tmp_path / "async.pt").exists() and (tmp_path / "client_rank1.pt").exists()

    results = run_fake_srun(_args("async", tmp_path, "--devices", "4", "--clients", "3", "--async-steps", str(steps),
                                  "--buffer", str(buffer_size), "--faults", "1:kill:2,2:stall:1"), 4, tmp_path,
                            timeout_s=TIMEOUT_S, done=finished)
    assert finished(), [r.log[-3000:] for r in results]
    assert results[2].returncode == -signal.SIGKILL  # rank 2 really died mid-run
    assert results[3].timed_out  # the stalled rank was still asleep when the launch was ended
    result = _async_result(tmp_path)
    assert result["version"] == steps and result["global_step"] == steps  # the server finished its run
    assert list(result["deaths"]) == [1] and result["stalled"] == [2]  # the report names who dropped
    assert result["participation"][1] == 2 and result["participation"][2] == 1  # accepted, once each
    _check_applied_once(result, buffer_size)
    assert "clients lost: 1 (rank 2" in results[0].log and "(stalled): [3]" in results[0].log


def test_elastic_restarts_after_killed_ranks_resume_to_the_uninterrupted_weights(tmp_path, one_node_two_processes):
    # 15 steps per epoch and rank; checkpoints at steps 15 and 30 (epoch ends). Attempt k SIGKILLs rank 1 at step 36
    # of the k-th strategy (ddp_ef21, then local_sgd); torchrun restarts both ranks each time and fit(ckpt_path="last")
    # resumes from step 30 (a strategy already finished reloads its final checkpoint). Step 30 is not a local-SGD sync
    # step (every 8), so the replicas differ there: each rank's own state must come back from the file.
    result = run_standalone(_args("resume", tmp_path, "--devices", "2", "--strategies", ",".join(RESUMED),
                                  "--ckpt-dir", str(tmp_path / "ckpt"), "--epochs", "3", "--kill-step", "36",
                                  "--kill-rank", "1"), 2, tmp_path, timeout_s=TIMEOUT_S, max_restarts=len(RESUMED))
    _ok([result])
    assert result.log.count("Signal 9 (SIGKILL)") + result.log.count("exitcode: -9") >= len(RESUMED)  # both died
    assert "Restoring states from the checkpoint path" in result.log
    for name in RESUMED:
        for rank in (0, 1):
            resumed = _saved(tmp_path, "resume", name, rank)
            assert resumed["global_step"] == 45
            assert _equal(resumed["params"], _saved(one_node_two_processes, "resume", name, rank)["params"]), rank
        key = {"ddp_ef21": "convergence/compressed_ddp", "local_sgd": "convergence/local_sgd"}[name]
        saved = torch.load(tmp_path / "ckpt" / name / "last.ckpt", weights_only=True)[key]
        assert saved["world_size"] == 2 and len(saved["ranks"]) == 2  # per-rank state travels in rank 0's file
