"""Budget-aware LR schedules at equal step budgets: final validation loss relative to cosine.

Tasks: the stdlib char-level transformer LM (AdamW, so refinement uses l1 norms) and the digits MLP classifier
(SGD with momentum, l2 norms). Schedules: cosine (baseline), linear, REX, UBA(phi=1), WSD (1-sqrt, 20% decay),
refined two-run (norms recorded during the linear run of the same seed, then ``RefinedSchedule``) and refined
online (``ScheduleRefinement(online=True)`` on top of warm-up + linear). Every run of a task has the same number of
optimizer steps, data order (per seed) and peak LR.

    python benchmarks/schedules.py            # 3 seeds, LM 150 steps, classifier 300 steps
    python benchmarks/schedules.py --quick    # 1 seed, LM 40 steps, classifier 60 steps

Prints a table of mean final validation loss and the mean per-seed ratio to cosine, and writes
``benchmarks/out/schedules.png``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from _common import figure, print_table
from lightning.pytorch import Trainer, seed_everything

from lightning_convergence.callbacks import ScheduleRefinement
from lightning_convergence.examples import CharTransformerLM, DigitsDataModule, MLPClassifier, StdlibTextDataModule
from lightning_convergence.optim import CosineDecay, LinearDecay, RefinedSchedule, REXDecay, UBADecay, WSDSchedule

SCHEDULES = ["cosine", "linear", "rex", "uba", "wsd", "refined", "refined_online"]


def make_schedule(name: str, opt: torch.optim.Optimizer, total: int, warmup: int, norms_path: Path | None):
    if name == "cosine":
        return CosineDecay(opt, total_steps=total, warmup_steps=warmup)
    if name in ("linear", "refined_online"):
        return LinearDecay(opt, total_steps=total, warmup_steps=warmup)
    if name == "rex":
        return REXDecay(opt, total_steps=total, warmup_steps=warmup)
    if name == "uba":
        return UBADecay(opt, total_steps=total, warmup_steps=warmup, phi=1.0)
    if name == "wsd":
        return WSDSchedule(opt, total_steps=total, warmup_steps=warmup, decay_fraction=0.2, decay_shape="1-sqrt")
    if name == "refined":  # the paper's run 2: no extra warm-up, the profile grows its own
        return RefinedSchedule(opt, norms=str(norms_path), total_steps=total)
    raise ValueError(name)


def with_schedule(model, make_opt: Callable, name: str, total: int, warmup: int, norms_path: Path | None):
    def configure():
        opt = make_opt(model.parameters())
        sched = make_schedule(name, opt, total, warmup, norms_path)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    model.configure_optimizers = configure
    return model


TASKS: dict[str, dict] = {
    "classifier": {
        "model": lambda: MLPClassifier(hidden=[128, 128]),
        "data": lambda: DigitsDataModule(batch_size=32, val_fraction=0.2, seed=0),
        "opt": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        "steps": (300, 60), "warmup": (0, 0),
    },
    "char_lm": {
        "model": lambda: CharTransformerLM(d_model=48, n_layers=2, n_heads=4, seq_len=64),
        "data": lambda: StdlibTextDataModule(seq_len=64, batch_size=16, max_chars=120_000),
        "opt": lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.01),
        "steps": (150, 40), "warmup": (8, 4),
    },
}


def run_one(task: str, name: str, seed: int, total: int, warmup: int, tmp: Path) -> tuple[float, list[float]]:
    spec = TASKS[task]
    seed_everything(seed, verbose=False)
    model, data = spec["model"](), spec["data"]()
    norms_path = tmp / f"{task}_seed{seed}_norms.json"
    with_schedule(model, spec["opt"], name, total, warmup, norms_path)
    callbacks = []
    if name == "linear":  # run 1 of the two-run method records its norms
        callbacks.append(ScheduleRefinement(norms_path=str(norms_path), log_plot=False))
    if name == "refined_online":
        callbacks.append(ScheduleRefinement(online=True, refit_every_n_steps=max(2, total // 10), log_plot=False))
    lrs: list[float] = []

    class LRTrace(ScheduleRefinement):  # records the rate each step used (runs after the callbacks above)
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            lrs.append(optimizer.param_groups[0]["lr"])

    callbacks.append(LRTrace(log_plot=False))
    trainer = Trainer(
        max_steps=total, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=callbacks,
        num_sanity_val_steps=0, default_root_dir=str(tmp),
    )
    trainer.fit(model, datamodule=data)
    val = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, default_root_dir=str(tmp)).validate(model, datamodule=data, verbose=False)
    return float(val[0]["val_loss"]), lrs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 seed and a few dozen steps")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, 1 with --quick)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    seeds = list(range(args.seeds or (1 if args.quick else 3)))
    idx = 1 if args.quick else 0
    results: dict[str, dict[str, list[float]]] = {}
    traces: dict[str, dict[str, list[float]]] = {}
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        for task in args.tasks:
            total, warmup = TASKS[task]["steps"][idx], TASKS[task]["warmup"][idx]
            results[task] = {s: [] for s in SCHEDULES}
            traces[task] = {}
            for seed in seeds:
                for name in SCHEDULES:  # "linear" precedes "refined": it writes the norms file
                    loss, lrs = run_one(task, name, seed, total, warmup, tmp)
                    print(f"  {task} seed {seed} {name}: val_loss {loss:.4f} ({time.time() - t0:.0f} s)", flush=True)
                    results[task][name].append(loss)
                    traces[task].setdefault(name, lrs)
            print(f"[{task}: {len(seeds)} seeds x {len(SCHEDULES)} schedules x {total} steps, "
                  f"{time.time() - t0:.0f} s so far]", flush=True)
    report(results, seeds, idx)
    plot(results, traces)


def report(results: dict[str, dict[str, list[float]]], seeds: list[int], idx: int) -> None:
    tasks = list(results)
    header = ["schedule"]
    for task in tasks:
        header += [f"{task} val_loss", f"{task} ratio", f"{task} ratio range"]
    rows = []
    for name in SCHEDULES:
        row = [name]
        for task in tasks:
            losses = results[task][name]
            ratios = [a / b for a, b in zip(losses, results[task]["cosine"])]
            row += [f"{statistics.mean(losses):.4f}", f"{statistics.mean(ratios):.4f}",
                    f"{min(ratios):.3f}-{max(ratios):.3f}"]
        rows.append(row)
    print_table(f"\nFinal validation loss at equal step budgets ({len(seeds)} seeds; ratio = mean over seeds of "
                f"loss / cosine loss of the same seed; < 1 is better)", header, rows)
    for task in tasks:
        mean = {n: statistics.mean(results[task][n]) for n in SCHEDULES}
        print(f"{task}: linear <= cosine: {mean['linear'] <= mean['cosine']}; "
              f"refined <= linear: {mean['refined'] <= mean['linear']}; "
              f"refined_online <= linear: {mean['refined_online'] <= mean['linear']}")


def plot(results: dict[str, dict[str, list[float]]], traces: dict[str, dict[str, list[float]]]) -> None:
    tasks = list(results)
    with figure("schedules", 2, len(tasks), (6 * len(tasks), 7)) as axes:
        if axes is not None:
            _draw(axes, tasks, results, traces)


def _draw(axes, tasks: list[str], results: dict[str, dict[str, list[float]]],
          traces: dict[str, dict[str, list[float]]]) -> None:
    for j, task in enumerate(tasks):
        ratios = [statistics.mean(a / b for a, b in zip(results[task][n], results[task]["cosine"])) for n in SCHEDULES]
        ax = axes[0][j]
        ax.bar(SCHEDULES, ratios, color=["gray"] + ["tab:blue"] * (len(SCHEDULES) - 1))
        ax.axhline(1.0, color="black", lw=0.8)
        lo, hi = min(ratios), max(ratios)
        ax.set_ylim(lo - 0.1 * (hi - lo + 1e-3), hi + 0.1 * (hi - lo + 1e-3))
        ax.set_title(f"{task}: final val loss / cosine")
        ax.tick_params(axis="x", rotation=30)
        ax = axes[1][j]
        for name, lrs in traces[task].items():
            ax.plot(lrs, label=name)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("lr (seed 0)")
        ax.legend(fontsize=7)


if __name__ == "__main__":
    main()
