"""The one benchmark harness: tables, plots, timers, free ports, torchrun launches and the slow-link namespace.

Every script in ``benchmarks/`` keeps only its experiment and takes the rest from here:

* :func:`print_table` prints (and returns) a fixed-width table; :func:`figure` makes a matplotlib (Agg) figure and
  writes it to ``benchmarks/out/<name>.png`` when the ``with`` block ends;
* :class:`StepTimer` times each optimizer step (by step, warm-up and post-validation steps dropped) and
  :class:`TrainClock` the training wall time with validation excluded, plus the validation curve against it;
* :func:`free_port`, :func:`torchrun_command` / :func:`torchrun_nodes` (one node / several torchrun "nodes") and
  :func:`run_on_link` launch ranks on 127.0.0.1, inside a rate-limited network namespace (:mod:`_netem`) when one can
  be made, and say whether the limit applied.

Scripts run as ``python benchmarks/<name>.py`` and import it as ``_common``; from the repository root it is
``benchmarks._common``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback

if __package__:  # imported as ``benchmarks._common`` (from the repository root)
    from benchmarks._netem import RateLimitedNamespace, lo_tx_bytes, netem_available
else:  # imported as ``_common`` by a script run as ``python benchmarks/<name>.py``
    from _netem import RateLimitedNamespace, lo_tx_bytes, netem_available

__all__ = [
    "OUT", "RateLimitedNamespace", "StepTimer", "TrainClock", "bench_env", "bench_trainer", "figure", "free_port",
    "lo_tx_bytes",
    "netem_available", "print_table", "run_on_link", "save_bar_plot", "time_to", "torch_hook_strategy",
    "torchrun_command", "torchrun_nodes", "with_warmup_cosine",
]

OUT = Path(__file__).resolve().parent / "out"
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------- timers
class StepTimer(Callback):
    """Wall time of each optimizer step, measured between step boundaries (accumulation micro-batches folded in).

    ``times`` lists the kept steps in order and ``by_step`` maps step → seconds. The first ``warmup`` steps are
    dropped, and so is the step after a validation run (its interval holds the validation).
    """

    def __init__(self, warmup: int = 5) -> None:
        self.warmup = warmup
        self.times: list[float] = []
        self.by_step: dict[int, float] = {}
        self._last: float | None = None
        self._step = -1

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self._step:
            return  # still accumulating
        self._step = trainer.global_step
        now = time.perf_counter()
        if self._last is not None and self._step > self.warmup:
            self.times.append(now - self._last)
            self.by_step[self._step] = now - self._last
        self._last = now

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self._last = None

    @property
    def median_ms(self) -> float:
        return 1e3 * statistics.median(self.times) if self.times else float("nan")


class TrainClock(Callback):
    """Training wall time with validation excluded, and the validation curve ``(step, elapsed_s, monitor)``."""

    def __init__(self, monitor: str = "val_loss") -> None:
        self.monitor = monitor
        self.elapsed, self._t0 = 0.0, None
        self.curve: list[tuple[int, float, float]] = []

    def _stop(self) -> None:
        if self._t0 is not None:
            self.elapsed += time.perf_counter() - self._t0
            self._t0 = None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._t0 = time.perf_counter()

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self._stop()

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is not None:
            self.curve.append((trainer.global_step, self.elapsed, float(value)))
        self._t0 = time.perf_counter()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._stop()


def time_to(curve: Sequence[tuple[int, float, float]], target: float) -> float | None:
    """Elapsed seconds of the first point of a :class:`TrainClock` curve at or below ``target`` (None if never)."""
    for _, elapsed, value in curve:
        if value <= target:
            return elapsed
    return None


# ------------------------------------------------------------------------------------------- tables and plots
def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def print_table(title: str, header: list[str], rows: list[list[Any]]) -> str:
    """Print and return a fixed-width table (floats with 4 significant digits)."""
    widths = [max(len(str(h)), *(len(_fmt(r[i])) for r in rows)) for i, h in enumerate(header)]
    lines = [title, "  ".join(str(h).ljust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(_fmt(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


@contextlib.contextmanager
def figure(name: str, nrows: int = 1, ncols: int = 1, figsize: tuple[float, float] = (7, 4)) -> Iterator[Any]:
    """``with figure("local_sgd", 1, 2, (12, 4)) as axes:`` draw, and the PNG is written to ``OUT/<name>.png``.

    ``axes`` is one ``Axes`` for a 1×1 figure, else the 2-D array ``plt.subplots(..., squeeze=False)`` gives. Without
    matplotlib the block still runs (on ``None``) and no file is written.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # matplotlib is an optional extra
        print("matplotlib missing: no plot", flush=True)
        yield None
        return
    fig, axes = plt.subplots(nrows, ncols, figsize=figsize, squeeze=False)
    try:
        yield axes[0][0] if nrows == ncols == 1 else axes
        fig.tight_layout()
        path = OUT / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        print(f"plot: {path}", flush=True)
    finally:
        plt.close(fig)


def save_bar_plot(name: str, labels: list[str], values: list[float], ylabel: str, title: str) -> None:
    """A bar chart written to ``OUT/<name>.png``."""
    with figure(name, figsize=(7, 3.5)) as ax:
        if ax is not None:
            ax.bar(labels, values)
            ax.set_ylabel(ylabel)
            ax.set_title(title)
            ax.tick_params(axis="x", rotation=20)


def bench_trainer(devices: int, strategy: Any, max_steps: int, callbacks: list[Callback]) -> Any:
    """A CPU ``Trainer`` for a timed training run: no logger, checkpoints, progress bar, summary or validation."""
    from lightning.pytorch import Trainer

    return Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_steps=max_steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0, callbacks=callbacks,
    )


def with_warmup_cosine(model: Any, steps: int, make_opt: Any = None) -> Any:
    """Give ``model`` a 5% linear warm-up then cosine-to-zero LR over ``steps`` on top of ``make_opt()`` (default: the
    module's own ``configure_optimizers``), stepped per optimizer step: the usual full recipe, same for every method."""
    import math

    import torch

    make_opt = make_opt or model.configure_optimizers
    warm = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warm) / max(1, steps - warm))))

    def configure() -> Any:
        opt = make_opt()
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    model.configure_optimizers = configure
    return model


# ---------------------------------------------------------------------------------------- launching ranks
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(script: str | Path, nproc: int, args: Sequence[str]) -> list[str]:
    """``python -m torch.distributed.run`` with ``nproc`` ranks on one node, rendezvous on 127.0.0.1:<free port>."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}", str(script), *args]


def bench_env(**extra: str) -> dict[str, str]:
    """The environment of benchmark ranks: this checkout first on ``PYTHONPATH``, one intra-op thread, no W&B."""
    return {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
            "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra}


def run_on_link(cmd: Sequence[str], rate: str | None, label: str, namespace: bool = True) -> bool:
    """Run ``cmd`` inside a fresh network namespace whose loopback is capped at ``rate`` (e.g. ``"100mbit"``).

    ``rate=None`` gives a private namespace with no cap (its ``/proc/net/dev`` still counts only the run's bytes);
    ``namespace=False`` runs on the host loopback. Without root or ``tc`` it warns (naming ``label``) and runs on
    the host loopback. Returns True when a rate limit applied. Raises ``CalledProcessError`` if the command fails.
    """
    reason = netem_available() if namespace else None
    if reason:
        print(f"{label}: no rate-limited link ({reason}): running WITHOUT a limit", file=sys.stderr)
    if reason or not namespace:
        subprocess.run(list(cmd), check=True, env=bench_env())
        return False
    with RateLimitedNamespace(rate) as ns:
        subprocess.run(ns.command(cmd), check=True, env=bench_env())
    return rate is not None


def torchrun_nodes(script: str | Path, args: Sequence[str], nproc_per_node: Sequence[int], timeout_s: float) -> None:
    """Run ``script args`` as ``len(nproc_per_node)`` torchrun nodes on 127.0.0.1 (c10d rendezvous hosted by node
    0, which starts first); waits for all, and always ends every process tree it started."""
    port, run_id, nnodes = free_port(), uuid.uuid4().hex[:8], len(nproc_per_node)
    procs: list[subprocess.Popen] = []
    try:
        for node, nproc in enumerate(nproc_per_node):
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc-per-node={nproc}",
                   "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={run_id}",
                   f"--rdzv-conf=is_host={int(node == 0)}", str(script), *args]
            procs.append(subprocess.Popen(cmd, env=bench_env(), start_new_session=True, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
            deadline = time.monotonic() + 60
            while node == 0 and time.monotonic() < deadline:  # the store must listen before the others look
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    time.sleep(0.1)
        for p in procs:
            p.wait(timeout=timeout_s)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # ours to end: the agent and its workers
            p.wait()


def torch_hook_strategy(state: Any, hook: Any, **kwargs: Any) -> Any:
    """A DDP strategy that registers one of torch's comm hooks on CPU too (Lightning drops them off CUDA).

    ``state`` may be a callable, called once the process group exists (``PowerSGDState`` needs it)."""
    from lightning_convergence.strategies._ddp_base import HookedDDPStrategy

    class TorchHookDDP(HookedDDPStrategy):
        def build_comm_hook(self, model: Any) -> tuple[Any, Any]:
            return (state() if callable(state) else state), hook

        def rank_state_dict(self) -> dict[str, Any]:
            return {}

        def load_rank_state_dict(self, rank_state: dict[str, Any]) -> None:
            return None

    return TorchHookDDP(**kwargs)
