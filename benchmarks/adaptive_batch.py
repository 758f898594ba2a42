"""Adaptive batch size (AdAdaGrad tests, noise-scale rule) against fixed small and large batches.

For the digits classifier (MLP, Adam) and the stdlib char LM (small transformer, AdamW): optimizer steps, training
samples and wall time until the validation loss first reaches a target, plus the per-step cost of the statistics.
Runs: fixed small batch, fixed large batch (8x, lr × sqrt 8), and AdaptiveBatchSize with the norm, inner-product,
augmented and noise-scale rules, each starting from the small batch (split into 2 micro-batches: the micro-batch
estimator needs 2 gradient samples per step) with sqrt LR scaling, growing up to the large batch, the per-device batch
growing at epoch boundaries.

    python benchmarks/adaptive_batch.py --quick
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, Trainer, seed_everything

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OUT, TrainClock, print_table, save_bar_plot

from lightning_convergence.callbacks import AdaptiveBatchSize
from lightning_convergence.examples import (
    CharTransformerLM,
    DigitsDataModule,
    MLPClassifier,
    StdlibTextDataModule,
)


class TargetWatch(Callback):
    """Evaluates the full validation loss every ``every`` optimizer steps; stops when it reaches ``target``."""

    def __init__(self, loss_fn: Any, val_batches: list[Any], target: float, every: int) -> None:
        self.loss_fn, self.val_batches, self.target, self.every = loss_fn, val_batches, target, every
        self.samples = 0
        self.hit: dict[str, float] | None = None
        self.curve: list[tuple[int, int, float]] = []
        self._t0 = 0.0
        self._eval_s = 0.0
        self._step = 0

    def on_train_start(self, trainer, pl_module):
        self._t0 = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._step = trainer.global_step
        self.samples += len(batch[0])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self._step or trainer.global_step % self.every:
            return
        t = time.perf_counter()
        with torch.no_grad():
            losses = [float(self.loss_fn(pl_module, b)) * len(b[0]) for b in self.val_batches]
        loss = sum(losses) / sum(len(b[0]) for b in self.val_batches)
        self._eval_s += time.perf_counter() - t
        self.curve.append((trainer.global_step, self.samples, loss))
        if self.hit is None and loss <= self.target:
            wall = time.perf_counter() - self._t0 - self._eval_s
            self.hit = {"steps": trainer.global_step, "samples": self.samples, "wall_s": wall}
            trainer.should_stop = True


def _classifier_loss(model: Any, batch: Any) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def _lm_loss(model: Any, batch: Any) -> torch.Tensor:
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def _task(name: str, quick: bool) -> dict[str, Any]:
    if name == "classifier":
        return {
            "model": lambda lr: MLPClassifier(hidden=(128, 128), lr=lr),
            "data": lambda bs: DigitsDataModule(batch_size=bs, seed=0),
            "loss": _classifier_loss, "small": 16, "lr": 1e-3, "target": 0.12 if quick else 0.10,
            "max_steps": 3000, "every": 10, "theta": 0.5, "nu": 1.0,
        }
    chars = 60_000 if quick else 150_000
    return {
        "model": lambda lr: CharTransformerLM(seq_len=32, d_model=64, n_layers=1, n_heads=4, lr=lr),
        "data": lambda bs: StdlibTextDataModule(seq_len=32, batch_size=bs, max_chars=chars),
        "loss": _lm_loss, "small": 16, "lr": 3e-3, "target": 2.15 if quick else 2.0,
        "max_steps": 1000 if quick else 3000, "every": 10, "theta": 0.25, "nu": 0.5,
    }


def _run(
    task: dict[str, Any], label: str, test: str | None, large: int, check_every_n_steps: int = 4
) -> dict[str, Any]:
    seed_everything(0, workers=True)
    small = task["small"]
    if test is None:
        batch = small if label == "fixed_small" else large
        lr = task["lr"] * math.sqrt(batch / small)
        dm, accumulate, callbacks = task["data"](batch), 1, []
    else:
        lr = task["lr"]
        dm, accumulate = task["data"](small // 2), 2
        callbacks = [AdaptiveBatchSize(
            test=test, eta=0.5, theta=task["theta"], nu=task["nu"], max_batch_size=large, max_growth_factor=2.0,
            max_per_device_batch_size=large, lr_scaling="sqrt", smoothing=0.9, check_every_n_steps=check_every_n_steps,
        )]
    model = task["model"](lr)
    dm.setup("fit")
    val_batches = list(dm.val_dataloader())
    watch = TargetWatch(task["loss"], val_batches, task["target"], task["every"])
    probe = TrainClock()
    trainer = Trainer(
        accelerator="cpu", devices=1, max_steps=task["max_steps"], max_epochs=-1, accumulate_grad_batches=accumulate,
        callbacks=[*callbacks, watch, probe], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        reload_dataloaders_every_n_epochs=1 if test else 0,
    )
    trainer.fit(model, datamodule=dm)
    steps = max(trainer.global_step, 1)
    out: dict[str, Any] = {"label": label, "hit": watch.hit, "steps_run": steps, "curve": watch.curve}
    train_s = probe.elapsed - watch._eval_s
    out["step_ms"] = 1e3 * train_s / steps
    if callbacks:
        cb = callbacks[0]
        out["final_batch"] = cb.global_batch_size
        out["overhead_ms"] = 1e3 * cb.overhead_total_s / steps
    else:
        out["final_batch"] = small if label == "fixed_small" else large
        out["overhead_ms"] = 0.0
    return out


def bench(name: str, quick: bool, check_every_n_steps: int) -> tuple[str, list[dict[str, Any]]]:
    task = _task(name, quick)
    large = task["small"] * 8
    runs = [_run(task, "fixed_small", None, large), _run(task, "fixed_large", None, large)]
    for test in ("norm", "inner_product", "augmented", "noise_scale"):
        runs.append(_run(task, test, test, large, check_every_n_steps))
    small_r, large_r = runs[0], runs[1]
    fixed_hits = [r for r in runs[:2] if r["hit"]]
    best_wall = min((r["hit"]["wall_s"] for r in fixed_hits), default=math.nan)
    rows = []
    for r in runs:
        h = r["hit"]
        if h is None:
            rows.append([r["label"], "-", "-", "-", "-", "-", "-", r["final_batch"], f"{r['overhead_ms']:.2f}", "-"])
            continue
        steps_ratio = h["steps"] / small_r["hit"]["steps"] if small_r["hit"] else math.nan
        samples_ratio = h["samples"] / large_r["hit"]["samples"] if large_r["hit"] else math.nan
        overhead_pct = 100 * r["overhead_ms"] / r["step_ms"] if r["step_ms"] > 0 else math.nan
        rows.append([
            r["label"], h["steps"], h["samples"], round(h["wall_s"], 2), round(steps_ratio, 3),
            round(samples_ratio, 3), round(h["wall_s"] / best_wall, 3), r["final_batch"],
            f"{r['overhead_ms']:.2f}", round(overhead_pct, 2),
        ])
    header = [
        "run", "steps", "samples", "wall_s", "steps/small", "samples/large", "wall/best_fixed", "final_batch",
        "stats_ms/step", "overhead_%",
    ]
    title = f"\n{name}: target val loss {task['target']} (quick={quick}, check_every_n_steps={check_every_n_steps})"
    text = print_table(title, header, rows)
    labels = [r["label"] for r in runs]
    save_bar_plot(
        f"adaptive_batch_{name}", labels,
        [r["hit"]["steps"] if r["hit"] else float("nan") for r in runs], "optimizer steps to target",
        f"{name}: steps to val loss {task['target']}",
    )
    return text, runs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller LM corpus and looser targets (~3 minutes)")
    parser.add_argument("--tasks", nargs="+", default=["classifier", "lm"], choices=["classifier", "lm"])
    parser.add_argument("--check-every-n-steps", type=int, default=4, help="optimizer steps between tests (paper: 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for name in args.tasks:
        bench(name, args.quick, args.check_every_n_steps)
    print(f"\nplots: {OUT}/adaptive_batch_<task>.png  (2-core CPU, shared: wall times are noisy)")


if __name__ == "__main__":
    main()
