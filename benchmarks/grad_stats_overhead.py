"""Overhead of GradientStatsMonitor on the char-level LM, against the same run without it.

    python benchmarks/grad_stats_overhead.py [--quick] [--steps N]

Prints median optimizer-step time per configuration and its ratio to the baseline measured in the same run, and
writes benchmarks/out/grad_stats_overhead.png. Target (shared/NOTES.md): monitoring callbacks add <= 2% per step.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from _common import StepTimer, print_table, save_bar_plot
from lightning.pytorch import Trainer, seed_everything

from lightning_convergence.callbacks import GradientStatsMonitor
from lightning_convergence.examples import CharTransformerLM, StdlibTextDataModule


def run(monitor: GradientStatsMonitor | None, steps: int, repeat: int = 1) -> tuple[float, float]:
    times = []
    overhead = []
    for r in range(repeat):
        seed_everything(r, verbose=False)
        timer = StepTimer(warmup=5)
        callbacks = [timer] + ([monitor] if monitor is not None else [])
        trainer = Trainer(
            accelerator="cpu", devices=1, max_steps=steps, accumulate_grad_batches=2, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            limit_val_batches=0, num_sanity_val_steps=0, callbacks=callbacks, log_every_n_steps=10,
        )
        trainer.fit(CharTransformerLM(), StdlibTextDataModule(batch_size=32, max_chars=120_000))
        times.append(timer.median_ms)
        if monitor is not None:
            overhead.append(monitor.last_metrics.get("convergence/grad_stats/step_overhead_ms", float("nan")))
    return min(times), (min(overhead) if overhead else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    steps = args.steps or (30 if args.quick else 80)
    repeat = 1 if args.quick else 3
    configs = {
        "baseline (no monitor)": None,
        "monitor every 10 steps": GradientStatsMonitor(log_every_n_steps=10),
        "monitor every step": GradientStatsMonitor(log_every_n_steps=1),
        "monitor every step + per-param": GradientStatsMonitor(log_every_n_steps=1, log_per_item=True),
    }
    run(None, 10)  # warm-up: first-run costs (allocator, thread pools) must not land on the baseline
    # Interleave the configurations (ABCD ABCD ...) so drifting load on a shared machine hits all alike.
    results: dict[str, tuple[float, float]] = {}
    for _ in range(repeat):
        for name, cb in configs.items():
            ms, own = run(cb, steps)
            prev = results.get(name, (float("inf"), float("inf")))
            results[name] = (min(prev[0], ms), min(prev[1], own))
    base = results["baseline (no monitor)"][0]
    rows = [[name, ms, ms / base, own] for name, (ms, own) in results.items()]
    print_table(
        f"GradientStatsMonitor overhead, char LM (0.4M params), batch 2x32x64, {steps} steps, best of {repeat}",
        ["configuration", "ms/step", "ratio", "monitor ms on a measured step"], rows,
    )
    save_bar_plot("grad_stats_overhead", [r[0] for r in rows], [r[2] for r in rows], "step time / baseline",
                  "GradientStatsMonitor overhead")


if __name__ == "__main__":
    main()
