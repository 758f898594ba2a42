"""Early stopping: Lightning's ``EarlyStopping(patience)`` vs GradES freezing and the statistical rules.

Runs every method on the digits classifier (MLP, Adam) and the stdlib char LM (1-layer transformer, AdamW) with the
same seed and budget, and prints, per task, ratios against the patience baseline measured in the same run:

* ``steps``: optimizer steps taken before stopping;
* ``compute``: a backward-FLOPs proxy, per step ``(6·P − 2·P_frozen)·E`` with ``P`` the parameter count, ``E`` the
  examples (tokens for the LM) per step and ``P_frozen`` the entries of matrices GradES froze with
  ``requires_grad=False`` (their weight gradients, a third of a matmul's training FLOPs, are skipped; input gradients
  and the forward are not, so this is counted honestly and conservatively);
* the final validation metric (accuracy, or loss for the LM), measured after training on the same split.

Usage: ``python benchmarks/early_stopping.py [--quick]``; writes ``benchmarks/out/early_stopping.png``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning as L
import torch
from _common import OUT, figure, print_table
from lightning.pytorch.callbacks import EarlyStopping

from lightning_convergence.callbacks import ConvergenceEarlyStopping, GradientEarlyStopping
from lightning_convergence.examples import CharTransformerLM, DigitsDataModule, MLPClassifier, StdlibTextDataModule


class ComputeMeter(L.Callback):
    """Counts optimizer steps and the backward-FLOPs proxy (see module docstring)."""

    def __init__(self, tokens_per_example: int = 1) -> None:
        self.tokens = tokens_per_example
        self.flops = 0.0
        self.steps = 0
        self._grades: GradientEarlyStopping | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.params = sum(p.numel() for p in pl_module.parameters())
        self._grades = next((c for c in trainer.callbacks if isinstance(c, GradientEarlyStopping)), None)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        frozen = 0
        if self._grades is not None and self._grades.resolved_mode == "requires_grad":
            frozen = self._grades.frozen_numel
        examples = int(batch[0].shape[0]) * self.tokens
        self.flops += (6 * self.params - 2 * frozen) * examples
        self.steps = trainer.global_step


def _task(name: str, quick: bool) -> dict[str, Any]:
    if name == "classifier":
        return {
            "data": lambda: DigitsDataModule(batch_size=32, val_fraction=0.2, seed=0),
            "model": lambda: MLPClassifier(hidden=(128, 128), lr=1e-3),
            "trainer": {"max_epochs": 15 if quick else 40},
            "metric": "val_acc", "mode": "max", "tokens": 1,
            "grades": {"tau": 2e-3, "grace_fraction": 0.3, "patience": 3},
        }
    return {
        "data": lambda: StdlibTextDataModule(seq_len=32, batch_size=32, max_chars=40_000),
        "model": lambda: CharTransformerLM(seq_len=32, d_model=64, n_layers=1, n_heads=2, lr=3e-3),
        "trainer": {"max_steps": 300 if quick else 900, "val_check_interval": 50, "check_val_every_n_epoch": None},
        "metric": "val_loss", "mode": "min", "tokens": 32,
        "grades": {"tau": 1.5e-3, "grace_fraction": 0.3, "patience": 3,
                   "include": ["in_proj_weight", "out_proj.weight", "linear1.weight", "linear2.weight"]},
    }


def _methods(task: dict[str, Any]) -> dict[str, Any]:
    return {
        "patience (Lightning EarlyStopping, patience=5)": lambda: [
            EarlyStopping(monitor="val_loss", mode="min", patience=5, min_delta=0.0)],
        "none (full budget)": lambda: [],
        "GradES (grad L1, mean)": lambda: [GradientEarlyStopping(
            signal="grad", reduction="mean", max_frozen_ratio=1.0, check_every_n_steps=1, **task["grades"])],
        "ConvergenceEarlyStopping (loss_curve)": lambda: [ConvergenceEarlyStopping(
            rules=["loss_curve"], check_every_n_steps=10, patience=3, min_delta=0.01, min_points=8)],
    }


def run_one(task: dict[str, Any], callbacks: list[L.Callback], seed: int = 0) -> dict[str, float]:
    L.seed_everything(seed, verbose=False)
    meter = ComputeMeter(task["tokens"])
    dm, model = task["data"](), task["model"]()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[*callbacks, meter], **task["trainer"],
    )
    t0 = time.perf_counter()
    trainer.fit(model, dm)
    wall = time.perf_counter() - t0
    result = trainer.validate(model, dm, verbose=False)[0]
    return {"steps": meter.steps, "flops": meter.flops, "metric": float(result[task["metric"]]), "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short budgets (about a minute)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per method; the table shows means")
    args = parser.parse_args()
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    rows = []
    for task_name in ("classifier", "char_lm"):
        task = _task(task_name, args.quick)
        results = {}
        for name, make in _methods(task).items():
            runs = [run_one(task, make(), seed=s) for s in range(args.seeds)]
            results[name] = {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}
        base = next(iter(results.values()))
        for name, r in results.items():
            metric_ratio = r["metric"] / base["metric"]
            rows.append((task_name, name, r["steps"], base["flops"] / r["flops"], r["metric"], metric_ratio,
                         r["wall_s"]))
    print_table("Convergence early stopping vs patience: compute saved = baseline (patience) FLOPs proxy / method's; "
                f"metric: val_acc (classifier), val_loss (LM); means over {args.seeds} seed(s)",
                ["task", "method", "steps", "compute saved (x)", "final metric", "metric/base", "wall s"],
                [[t, n, round(steps), round(saved, 2), round(metric, 4), round(ratio, 4), round(wall, 1)]
                 for t, n, steps, saved, metric, ratio, wall in rows])
    with figure("early_stopping", 1, 2, (11, 4)) as axes:
        if axes is not None:
            _plot(axes[0], rows)


def _plot(axes, rows: list[tuple]) -> None:
    for ax, task_name in zip(axes, ("classifier", "char_lm")):
        sub = [r for r in rows if r[0] == task_name]
        ax.bar(range(len(sub)), [r[3] for r in sub], color="tab:blue")
        ax.set_xticks(range(len(sub)), [r[1].split(" (")[0] for r in sub], rotation=20, fontsize=8)
        ax.set_ylabel("compute saved vs patience (x)")
        ax.set_title(f"{task_name}: metric ratio " + ", ".join(f"{r[5]:.3f}" for r in sub), fontsize=9)


if __name__ == "__main__":
    main()
