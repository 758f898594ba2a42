"""The cores on real gloo ranks (forked): NoLoCo pairs agree everywhere and never all-reduce; DiLoCo and CO2 over
the real communicator."""

from __future__ import annotations

import torch
import torch.distributed as dist

from lightning_convergence.averaging import CO2, DiLoCo, NoLoCo, TorchDistCommunicator, noloco_pairs
from tests.helpers.dist import run_processes


def _noloco_rank(rank: int, world_size: int) -> dict:
    calls = {"all_reduce": 0}
    real = dist.all_reduce

    def spy(*args, **kwargs):
        calls["all_reduce"] += 1
        return real(*args, **kwargs)

    dist.all_reduce = spy  # the core must never reach it
    try:
        comm = TorchDistCommunicator()
        outer = NoLoCo(lr=0.7, momentum=0.9)
        theta = [torch.zeros(3)]
        outer.init_state(theta)
        history = []
        for step in range(1, 6):
            theta[0].copy_(torch.arange(3.0) + 10 * rank + step)  # each rank's local progress differs
            before = theta[0].clone()
            outer.sync(theta, comm, step)
            history.append((before.tolist(), theta[0].tolist()))  # plain lists cross the queue
        return {"pairs": [noloco_pairs(s, world_size) for s in range(1, 40)], "calls": calls["all_reduce"],
                "history": history}
    finally:
        dist.all_reduce = real


def test_averaging_noloco_pairs_identical_on_all_ranks_and_no_all_reduce():
    results = run_processes(_noloco_rank, 4)
    assert all(r["pairs"] == results[0]["pairs"] for r in results)
    assert all(r["calls"] == 0 for r in results)
    assert len({tuple(p) for p in results[0]["pairs"]}) > 1  # the pairing changes with the step
    for step_pairs in results[0]["pairs"]:
        assert sorted(x for pair in step_pairs for x in pair) == [0, 1, 2, 3]
    # each rank's update used exactly its partner's θ (hand formula with the gathered θ's)
    phi = {r: torch.zeros(3) for r in range(4)}
    m = {r: torch.zeros(3) for r in range(4)}
    for i, step in enumerate(range(1, 6)):
        for a, b in noloco_pairs(step, 4):
            for me, other in ((a, b), (b, a)):
                mean = (torch.tensor(results[me]["history"][i][0]) + torch.tensor(results[other]["history"][i][0])) / 2
                m[me] = 0.9 * m[me] + 0.7 * (mean - phi[me])
        for r in range(4):
            phi[r] = phi[r] + m[r]
            torch.testing.assert_close(torch.tensor(results[r]["history"][i][1]), phi[r])  # float32 op order only


def _diloco_co2_rank(rank: int, world_size: int) -> dict:
    comm = TorchDistCommunicator()
    dil, co2 = DiLoCo(lr=0.7, momentum=0.9), CO2(lr=1.0, momentum=0.0, clip=False)
    p_dil, p_co2 = [torch.zeros(4)], [torch.zeros(4)]
    dil.init_state(p_dil)
    co2.init_state(p_co2)
    for step in range(1, 4):
        p_dil[0].add_(rank + 1.0)
        p_co2[0].add_(rank + 1.0)
        dil.sync(p_dil, comm, step)
        co2.sync(p_co2, comm, step)
    co2.finalize(p_co2, comm)
    return {"dil": p_dil[0].tolist(), "co2": p_co2[0].tolist()}


def test_averaging_diloco_and_co2_on_real_ranks():
    r0, r1 = ({k: torch.tensor(v) for k, v in r.items()} for r in run_processes(_diloco_co2_rank, 2))
    assert torch.equal(r0["dil"], r1["dil"]) and torch.equal(r0["co2"], r1["co2"])
    # DiLoCo by hand: each round mean Δ = −1.5 (ranks add 1 and 2)
    ref = torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.SGD([ref], lr=0.7, momentum=0.9, nesterov=True)
    for _ in range(3):
        ref.grad = torch.full((4,), -1.5)
        opt.step()
    torch.testing.assert_close(r0["dil"], ref.detach())
    # CO2 with lr 1, no momentum, after finalize: every round's mean progress (+1.5) is applied exactly once
    torch.testing.assert_close(r0["co2"], torch.full((4,), 4.5))
