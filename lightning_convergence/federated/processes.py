"""Where the client processes of a federated run come from (torch only, no Lightning).

* **forked** (one machine): :func:`fork_clients` forks one process per client from the server process and joins the
  server to their gloo group as rank 0;
* **launched** (torchrun, SLURM, Lightning's launcher): every launched process runs the same command, rank 0 is the
  server; :func:`check_launch` says whether a launch of ``world`` processes can run the configured clients.

Also :func:`check_fl_arguments`, the argument checks shared by every runner of a server rule, and
:func:`server_step_metrics`, what one server update reports (the adapter logs it).
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import socket
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from lightning_convergence._checks import (
    argument_error,
    check_choice,
    check_instance,
    check_int,
    check_number,
    check_numbers,
)
from lightning_convergence.federated.base import ServerRule
from lightning_convergence.federated.partition import Participation
from lightning_convergence.federated.transport import ClientFault, ClientWork, ParamLayout, serve_clients, torch_p2p

__all__ = ["FLArguments", "check_fl_arguments", "check_launch", "fork_clients", "free_port", "server_step_metrics"]

FAULT_KINDS = ("crash", "kill", "stall")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a gloo rendezvous on one machine)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class FLArguments:
    """The checked, normalised arguments of a federated run (see ``AsyncFederatedStrategy`` for their meaning)."""

    rule: ServerRule
    num_clients: int
    local_steps: int
    speeds: list[float]
    participation: Participation | None
    event_order: list[int] | None
    faults: dict[int, ClientFault]


def check_fl_arguments(owner: str, rule: ServerRule, num_clients: int, local_steps: int,
                       speeds: Sequence[float] | None, participation_probs: Sequence[float] | None, seed: int,
                       event_order: Sequence[int] | None, faults: dict[int, Sequence[Any]] | None,
                       **timeouts_s: float) -> FLArguments:
    """Check every argument of a federated run at construction; ``timeouts_s`` are finite numbers >= 0 by name.

    Raises:
        TypeError: a ``rule`` that is not a ``ServerRule``, a non-int count, a non-number speed or timeout.
        ValueError: out-of-range values, ``participation_probs`` with a non-round rule, ``event_order`` with a
            synchronous rule, an unknown fault kind.
    """
    check_int(owner, "num_clients", num_clients, 1)
    check_instance(owner, "rule", rule, ServerRule, "a ServerRule (e.g. FedBuff)")
    check_int(owner, "local_steps", local_steps, 1)
    speeds = [1.0] * num_clients if speeds is None else check_numbers(owner, "speeds", list(speeds), num_clients, 0)
    for name, value in timeouts_s.items():
        check_number(owner, name, value, 0)
    participation = None
    if participation_probs is not None:
        if not rule.round_based:
            raise argument_error(owner, "participation_probs", "None with a rule that is not round-based "
                                 "(use FedAvg, FedProx or FedAU)", type(rule).__name__)
        probs = check_numbers(owner, "participation_probs", list(participation_probs), num_clients, 0, 1,
                              low_open=True)
        participation = Participation(probs=probs, seed=seed)
    if event_order is not None and rule.synchronous:
        raise argument_error(owner, "event_order", "None with a synchronous rule (use FedAsync or FedBuff)",
                             type(rule).__name__)
    checked_faults: dict[int, ClientFault] = {}
    for cid, spec in (faults or {}).items():
        kind, after = spec
        check_choice(owner, "faults", kind, FAULT_KINDS)
        checked_faults[int(cid)] = ClientFault(kind, int(after))
    order = None if event_order is None else [int(c) for c in event_order]
    return FLArguments(rule, num_clients, local_steps, speeds, participation, order, checked_faults)


def check_launch(owner: str, num_clients: int, world: int, event_order: Sequence[int] | None) -> None:
    """Raise unless a launch of ``world`` processes (rank 0 the server) can serve ``num_clients`` clients."""
    if num_clients < world - 1:
        raise argument_error(owner, "num_clients", f">= {world - 1}", num_clients, hint=(
            f"This launch has {world} processes (rank 0 is the server, ranks 1..{world - 1} serve clients): launch at "
            f"most {num_clients + 1} processes or raise `num_clients` (and the datamodule's) to {world - 1}."))
    if event_order is not None and num_clients != world - 1:
        raise argument_error(owner, "event_order", f"None when {num_clients} clients share {world - 1} launched "
                             "client ranks (it needs one client per rank)", list(event_order))


def _client_entry(cid: int, world: int, port: int, timeout_s: float, module: Any, work: ClientWork,
                  layout: ParamLayout, local_steps: int, prox_mu: float) -> None:
    code = 0
    try:
        torch.set_num_threads(1)
        if hasattr(module, "trainer"):
            module.trainer = None  # self.log() inside training_step becomes a no-op on clients
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=cid + 1, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
        serve_clients({cid: work}, module, layout, local_steps, prox_mu, torch_p2p())
    except BaseException:  # the server sees the dropped connection; the traceback goes to stderr
        traceback.print_exc()
        code = 1
    finally:
        os._exit(code)  # never run the parent's Lightning/pytest teardown in a forked child


def fork_clients(works: Sequence[ClientWork], module: Any, layout: ParamLayout, local_steps: int, prox_mu: float,
                 timeout_s: float) -> list[Any]:
    """Fork one process per client (rank ``1 + client id``) and join this process to their gloo group as rank 0.

    Returns the processes (daemons; the caller joins them and kills any that stalls).
    """
    port, world = free_port(), len(works) + 1
    ctx = mp.get_context("fork")
    procs = []
    for cid, work in enumerate(works):
        proc = ctx.Process(target=_client_entry, daemon=True,
                           args=(cid, world, port, timeout_s, module, work, layout, local_steps, prox_mu))
        proc.start()
        procs.append(proc)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    return procs


def server_step_metrics(rule: ServerRule, server_metrics: dict[str, float], losses: Sequence[float],
                        log_per_item: bool = False) -> tuple[float, dict[str, float]]:
    """The mean finite client loss of one server update (NaN if none) and the ``convergence/fl/*`` metrics."""
    finite = [x for x in losses if math.isfinite(x)]
    loss = sum(finite) / len(finite) if finite else float("nan")
    metrics = rule.metrics(log_per_item)
    metrics.update(server_metrics)
    if finite:
        metrics["client_loss"] = loss
    return loss, metrics
