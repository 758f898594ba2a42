"""Shared benchmark plumbing: step timing, ratio tables, and plots (matplotlib, Agg)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback

OUT = Path(__file__).resolve().parent / "out"


class StepTimer(Callback):
    """Wall time of each optimizer step (first ``warmup`` steps dropped), measured between step boundaries."""

    def __init__(self, warmup: int = 5) -> None:
        self.warmup = warmup
        self.times: list[float] = []
        self._last: float | None = None
        self._step = -1

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self._step:
            return  # still accumulating
        self._step = trainer.global_step
        now = time.perf_counter()
        if self._last is not None and self._step > self.warmup:
            self.times.append(now - self._last)
        self._last = now

    @property
    def median_ms(self) -> float:
        return 1e3 * statistics.median(self.times) if self.times else float("nan")


def print_table(title: str, header: list[str], rows: list[list[Any]]) -> str:
    """Print and return a fixed-width table."""
    widths = [max(len(str(h)), *(len(_fmt(r[i])) for r in rows)) for i, h in enumerate(header)]
    lines = [title, "  ".join(str(h).ljust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(_fmt(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def save_bar_plot(path: Path, labels: list[str], values: list[float], ylabel: str, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(labels, values)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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
