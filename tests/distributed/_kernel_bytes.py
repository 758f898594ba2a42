"""Run inside a private network namespace (``unshare -rn``): ``W`` forked gloo ranks run every collective of the
communication layer on payloads of a few MB, and rank 0 reads the bytes that crossed ``lo`` from ``/proc/net/dev``
before and after (between barriers). Prints one JSON line: the kernel's count and the sum of the ranks' own counts.

    unshare -rn sh -c 'ip link set lo up && python -m tests.distributed._kernel_bytes 3'
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from benchmarks._netem import lo_tx_bytes
from lightning_convergence.comm import TorchDistCommunicator, average_payloads, first_round, quantized_mean_async
from lightning_convergence.compress import CyclicTopK, TopK
from tests.helpers.dist import run_processes


def _ranks(rank: int, world_size: int) -> dict:
    comm = TorchDistCommunicator()
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(1_000_000, generator=gen)
    # Read the counter *before* the barrier: no rank can start sending until rank 0 has entered it (read after it,
    # a loaded rank 0 could miss the first megabytes its peers already pushed through their socket buffers).
    before = lo_tx_bytes() if rank == 0 else 0
    dist.barrier()
    start = comm.link_bytes_total
    comm.all_reduce_sum(x.clone())  # ring all-reduce, 4 MB
    comm.all_gather(x[:250_000].clone())  # all-gather, 1 MB each
    comm.all_to_all(x[: 250_000 * world_size].clone())  # all-to-all
    comm.broadcast(x[:500_000].clone(), root=1)  # tree broadcast, 2 MB
    quantized_mean_async(x, comm).wait()  # 8-bit reduce-scatter + all-gather
    comp = CyclicTopK(0.05)
    comp.bind(rank, world_size, comm.backend, "cpu")
    first_round(comp, [("w", x, 0)], comm)  # the leader's indices, broadcast
    average_payloads([comp.compress(x, 0, "w"), TopK(0.05).compress(x, 0, "v")], comm)  # all-reduce + all-gather
    counted = comm.link_bytes_total - start
    dist.barrier()
    after = lo_tx_bytes() if rank == 0 else 0
    return {"counted": counted, "kernel": after - before}


if __name__ == "__main__":
    w = int(sys.argv[1])
    res = run_processes(_ranks, w)
    print(json.dumps({"world_size": w, "kernel": res[0]["kernel"], "counted": sum(r["counted"] for r in res)}))
