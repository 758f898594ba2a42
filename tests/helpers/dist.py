"""Helpers for multi-process tests on gloo: free ports, forked process groups, ddp_fork strategies.

Two ways to run real ranks:

* :func:`run_processes` forks ``world_size`` processes, initialises a gloo group in each and runs a plain function
  (for cores that take an ``all_reduce`` callable or a process group). Results come back through a queue; an
  exception in any rank fails the test with that rank's traceback.
* :func:`fork_strategy_kwargs` gives the arguments that make any ``DDPStrategy`` subclass run as ``ddp_fork`` on
  gloo with a short timeout, and :class:`DumpOnRanks` writes per-rank results to files (with ``ddp_fork`` the parent
  never sees the ranks' objects).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

TIMEOUT = timedelta(seconds=60)  # a hung collective fails the test in a minute instead of 30


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple, queue: Any,
            init_group: bool = True) -> None:
    try:
        torch.set_num_threads(1)
        if init_group:
            dist.init_process_group(
                "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size, timeout=TIMEOUT
            )
        result = fn(rank, world_size, *args)
        queue.put((rank, "ok", result))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_processes(fn: Callable[..., Any], world_size: int = 2, *args: Any, timeout_s: float = 120,
                  init_group: bool = True) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` forked processes joined by a gloo group (none with
    ``init_group=False``: for code that sets up its own, such as the federated server).

    Returns the results ordered by rank. ``fn`` and its results must be picklable only for the results.
    """
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue, init_group))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in range(world_size):
            rank, status, payload = queue.get(timeout=timeout_s)
            if status == "ok":
                results[rank] = payload
            else:
                errors.append(f"rank {rank}:\n{payload}")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("a rank failed:\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]


def fork_strategy_kwargs() -> dict[str, Any]:
    """Keyword arguments that turn a ``DDPStrategy`` (or subclass) into fork-started gloo ranks."""
    return {"start_method": "fork", "process_group_backend": "gloo", "timeout": TIMEOUT}


def ddp_fork_strategy(**kwargs: Any):
    """A plain ``DDPStrategy`` started with fork on gloo (the baseline in equivalence tests)."""
    from lightning.pytorch.strategies import DDPStrategy

    return DDPStrategy(**fork_strategy_kwargs(), **kwargs)


def rank_file(directory: Path | str, rank: int) -> Path:
    return Path(directory) / f"rank{rank}.pt"


def load_rank_results(directory: Path | str, world_size: int) -> list[Any]:
    """Load what :class:`DumpOnRanks` wrote, ordered by rank."""
    return [torch.load(rank_file(directory, r), weights_only=False) for r in range(world_size)]


def _dump_callback_cls():
    from lightning.pytorch import Callback

    class DumpOnRanks(Callback):
        """At the end of fit, each rank saves ``fn(trainer, pl_module)`` to ``directory/rank<k>.pt``."""

        def __init__(self, directory: Path | str, fn: Callable[[Any, Any], Any]) -> None:
            self.directory = Path(directory)
            self.fn = fn

        def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
            self.directory.mkdir(parents=True, exist_ok=True)
            torch.save(self.fn(trainer, pl_module), rank_file(self.directory, trainer.global_rank))

    return DumpOnRanks


def __getattr__(name: str) -> Any:  # lazy: importing this module must not import lightning
    if name == "DumpOnRanks":
        return _dump_callback_cls()
    raise AttributeError(name)


def params_snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of every parameter, by name."""
    return {k: v.detach().cpu().clone() for k, v in module.named_parameters()}


ENV_KEYS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE")


def snapshot_env() -> dict[str, str | None]:
    return {k: os.environ.get(k) for k in ENV_KEYS}


def restore_env(saved: dict[str, str | None]) -> None:
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
