"""Start torchrun "nodes" on 127.0.0.1 from a test and always end their process trees.

``run_nodes`` starts one ``torchrun`` per node (c10d rendezvous on 127.0.0.1, node 0 hosts the rendezvous store and
starts first), waits for all of them with a deadline, and kills every process group it started in a ``finally``.
``run_standalone`` is one node with ``--standalone``. Workers inherit ``PYTHONPATH`` (this checkout), one intra-op
thread and ``WANDB_MODE=disabled``. Nothing listens on or connects to anything but 127.0.0.1.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "worker.py"


@dataclass
class NodeResult:
    returncode: int
    timed_out: bool  # killed at the deadline
    log: str


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(max_restarts: int = 0) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE",
                "GROUP_RANK", "TORCHELASTIC_RUN_ID", "PL_GLOBAL_SEED"):
        env.pop(key, None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    if max_restarts > 0:
        # torch 2.13 keeps one shared rendezvous TCPStore across restart rounds, so a restarted worker can read the
        # dead worker's gloo address and fail to connect; a fresh store per round avoids it (docs/multinode.md).
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    return env


def _wait_listening(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)


def _finish(procs: list[subprocess.Popen], logs: list[Path], deadline: float,
            done: Callable[[], bool] | None = None) -> list[NodeResult]:
    """Wait for every node until ``deadline``, or until ``done()`` holds (then 1 s of grace), and kill the rest."""
    killed: set[int] = set()
    try:
        grace_end = None
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            if grace_end is None and done is not None and done():
                grace_end = time.monotonic() + 1.0
            if grace_end is not None and time.monotonic() > grace_end:
                break
            time.sleep(0.2)
    finally:
        for i, p in enumerate(procs):
            if p.poll() is None:
                killed.add(i)
            try:
                os.killpg(p.pid, signal.SIGKILL)  # the torchrun agent and any worker left: ours to end
            except ProcessLookupError:
                pass
            p.wait(timeout=10)
    return [NodeResult(p.returncode, i in killed, log.read_text()) for i, (p, log) in enumerate(zip(procs, logs))]


def run_nodes(args: Sequence[str], nproc_per_node: Sequence[int], tmp: Path, timeout_s: float = 90.0,
              max_restarts: int = 0, module: bool = False, done: Callable[[], bool] | None = None) -> list[NodeResult]:
    """Run ``python [-m] args`` as ``len(nproc_per_node)`` torchrun nodes on 127.0.0.1; results by node rank.

    ``done``: a condition on the workers' outputs after which the launch is ended (1 s later) even if agents are
    still running. Needed when a node failed on purpose: the surviving torchrun agents then wait in torch's exit
    barrier (300 s, not settable from the command line) for the failed agent, long after their workers finished.
    A node ended this way has ``timed_out`` True.
    """
    port, run_id, nnodes = free_port(), uuid.uuid4().hex[:8], len(nproc_per_node)
    deadline = time.monotonic() + timeout_s
    procs: list[subprocess.Popen] = []
    logs: list[Path] = []
    try:
        for k, nproc in enumerate(nproc_per_node):
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc-per-node={nproc}",
                   "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={run_id}",
                   f"--rdzv-conf=is_host={1 if k == 0 else 0},join_timeout=60", f"--max-restarts={max_restarts}",
                   "--monitor-interval=0.2", *(["-m"] if module else []), *args]
            logs.append(tmp / f"node{k}-{run_id}.log")
            with open(logs[-1], "w") as out:
                procs.append(subprocess.Popen(cmd, cwd=ROOT, env=_env(max_restarts), stdout=out,
                                              stderr=subprocess.STDOUT, start_new_session=True))
            if k == 0:
                _wait_listening(port, deadline)  # node 0 must host the rendezvous store before the others look
    finally:
        results = _finish(procs, logs, deadline, done)
    return results


def run_standalone(args: Sequence[str], nproc: int, tmp: Path, timeout_s: float = 90.0, max_restarts: int = 0,
                   module: bool = False) -> NodeResult:
    """Run ``python [-m] args`` as one torchrun node (``--standalone``) with ``nproc`` processes."""
    deadline = time.monotonic() + timeout_s
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           f"--max-restarts={max_restarts}", "--monitor-interval=0.2", *(["-m"] if module else []), *args]
    log = tmp / f"standalone-{uuid.uuid4().hex[:6]}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(max_restarts), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return _finish([proc], [log], deadline)[0]


def run_plain(args: Sequence[str], tmp: Path, timeout_s: float = 90.0) -> NodeResult:
    """Run ``python args`` with no launcher (Lightning's own launcher starts the other local processes)."""
    deadline = time.monotonic() + timeout_s
    log = tmp / f"plain-{uuid.uuid4().hex[:6]}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return _finish([proc], [log], deadline)[0]


def run_fake_srun(args: Sequence[str], ntasks: int, tmp: Path, timeout_s: float = 90.0,
                  done: Callable[[], bool] | None = None) -> list[NodeResult]:
    """Run ``python args`` as ``ntasks`` tasks of one SLURM node the way ``srun`` starts them (the ``SLURM_*``
    variables Lightning reads), without SLURM: Lightning's ``SLURMEnvironment`` takes the ranks from them.

    No agent stands between the tasks, so a task that dies takes no other task with it; ``done`` as in
    :func:`run_nodes`."""
    deadline = time.monotonic() + timeout_s
    port, job = free_port(), str(10_000 + os.getpid() % 50_000)
    procs, logs = [], []
    try:
        for task in range(ntasks):
            env = _env()
            env.update(SLURM_NTASKS=str(ntasks), SLURM_NTASKS_PER_NODE=str(ntasks), SLURM_NNODES="1",
                       SLURM_PROCID=str(task), SLURM_LOCALID=str(task), SLURM_NODEID="0",
                       SLURM_NODELIST="127.0.0.1", SLURM_JOB_ID=job, SLURM_JOB_NAME="lc-test",
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            logs.append(tmp / f"srun-task{task}-{uuid.uuid4().hex[:6]}.log")
            with open(logs[-1], "w") as out:
                procs.append(subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=out,
                                              stderr=subprocess.STDOUT, start_new_session=True))
    finally:
        results = _finish(procs, logs, deadline, done)
    return results
