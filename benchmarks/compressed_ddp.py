"""Compressed DDP vs plain DDP, torch's fp16 hook and PowerSGD, on a private (optionally rate-limited) link, gloo.

    # world sizes 2, 4 and 8 in one run: kernel-counted link bytes per rank and the final-loss gap to DDP
    python benchmarks/compressed_ddp.py --tasks lm --rates unlimited --world-size 2 4 8 --steps 300 --warmup 5 \
        --optimizer sgd --lr 0.2 --schedule cosine --methods ddp ef14_powersgd_r8_8bit ef14_powersgd_r7_8bit
    # logged ratio against the kernel's on the 6.4M-parameter, 102-tensor LM (step times at W=2: the hook's cost)
    python benchmarks/compressed_ddp.py --tasks lm100 --rates unlimited --world-size 2 3 4 --steps 20 --warmup 5 \
        --optimizer sgd --lr 0.2 --methods ddp powersgd_r4 ef14_powersgd_r7_8bit ef14_cyclic_topk1%
    python benchmarks/compressed_ddp.py --hook-cost     # the hook's own CPU time for 10, 100, 300 tensors, W = 1
    python benchmarks/compressed_ddp.py --quick         # 100 Mbit/s link, 2 ranks, Adam, a few methods

For every link rate and world size the script creates a fresh network namespace (``run_on_link`` of
:mod:`benchmarks._common`; its loopback capped by ``tc tbf`` unless the rate is ``unlimited``), launches
``torchrun --nproc_per_node=W`` inside it once per task (char LM ``lm``: 438k parameters in 30 tensors; ``lm100``:
6.4M in 102; digits MLP), and the ranks train every method in turn from the same seed with the same data order. Per
method it measures:

* link bytes/step: ``/proc/net/dev`` of the namespace's ``lo`` (all ranks; printed per rank), after ``--warmup``
  steps (excludes the parameter broadcast and the uncompressed first step of EF21-type rules);
* our own counts over the same steps (summed over ranks): link bytes sent and what plain DDP sends at this W, whose
  quotient is the logged ``convergence/compress/ratio``;
* median step time, mean training loss over the last 10% of steps (equal steps for all methods; its gap to DDP's),
  and the cumulative step time until the smoothed loss first reaches plain DDP's smoothed loss at 75% of its steps.

All are printed as ratios to plain DDP measured in the same run at the same W, and plotted into
``benchmarks/out/``. Without root (no namespaces) the harness warns and runs on the host loopback, as
``--no-netem`` does on purpose: the kernel's count then includes any other traffic on it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (
    OUT,
    bench_trainer,
    figure,
    lo_tx_bytes,
    print_table,
    run_on_link,
    torchrun_command,
    with_warmup_cosine,
)

# name -> (kind, options). kind: ddp | fp16 | powersgd | ours
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddp": ("ddp", {}),
    "fp16_hook": ("fp16", {}),
    "powersgd_r1": ("powersgd", {"rank": 1}),
    "powersgd_r4": ("powersgd", {"rank": 4}),
    "ef21_topk1%": ("ours", {"feedback": "ef21", "compressor": "topk"}),
    "ef21_sgdm_topk1%": ("ours", {"feedback": "ef21_sgdm", "compressor": "topk"}),
    "econtrol_topk1%": ("ours", {"feedback": "econtrol", "compressor": "topk"}),
    "ef14_topk1%": ("ours", {"feedback": "ef14", "compressor": "topk"}),
    "ef21_topk1%_8bit": ("ours", {"feedback": "ef21", "compressor": "topk8"}),
    "ef14_sign": ("ours", {"feedback": "ef14", "compressor": "sign"}),
    "ef21_topk10%": ("ours", {"feedback": "ef21", "compressor": "topk10"}),
    "ef21_sgdm_topk10%": ("ours", {"feedback": "ef21_sgdm", "compressor": "topk10"}),
    "econtrol_topk10%": ("ours", {"feedback": "econtrol", "compressor": "topk10"}),
    "ef14_lowrank_r4": ("ours", {"feedback": "ef14", "compressor": "lowrank4"}),
    "ef21_lowrank_r4": ("ours", {"feedback": "ef21", "compressor": "lowrank4"}),
    "none_ternary": ("ours", {"feedback": "none", "compressor": "ternary"}),
    "ef14_lowrank_r2": ("ours", {"feedback": "ef14", "compressor": "lowrank2"}),
    "ef21_lowrank_r2": ("ours", {"feedback": "ef21", "compressor": "lowrank2"}),
    "ef14_topk2%_8bit": ("ours", {"feedback": "ef14", "compressor": "topk2_8"}),
    "ef21_topk2%_8bit": ("ours", {"feedback": "ef21", "compressor": "topk2_8"}),
    "ef14_topk1%_8bit": ("ours", {"feedback": "ef14", "compressor": "topk8"}),
    # PowerSGD's two rounds per step (LowRank(rounds=2)): r·(n+m) floats per matrix, like torch's hook
    "ef14_powersgd_r4": ("ours", {"feedback": "ef14", "compressor": "powersgd4"}),
    "ef14_powersgd_r2": ("ours", {"feedback": "ef14", "compressor": "powersgd2"}),
    "ef14_powersgd_r8": ("ours", {"feedback": "ef14", "compressor": "powersgd8"}),
    "ef14_powersgd_r16": ("ours", {"feedback": "ef14", "compressor": "powersgd16"}),
    # int8 factors with per-column scales (LowRank(factor_bits=8)): ~4x fewer bytes per factor at 2 ranks
    "ef14_powersgd_r4_8bit": ("ours", {"feedback": "ef14", "compressor": "powersgd4_8"}),
    "ef14_powersgd_r8_8bit": ("ours", {"feedback": "ef14", "compressor": "powersgd8_8"}),
    "ef14_powersgd_r9_8bit": ("ours", {"feedback": "ef14", "compressor": "powersgd9_8"}),
    "ef14_powersgd_r7_8bit": ("ours", {"feedback": "ef14", "compressor": "powersgd7_8"}),
    "ef21_powersgd_r4": ("ours", {"feedback": "ef21", "compressor": "powersgd4"}),
    # ScaleCom's cyclic local Top-K: the leader's indices by broadcast, everyone's values by one all-reduce
    "ef14_cyclic_topk1%": ("ours", {"feedback": "ef14", "compressor": "cyclic1"}),
    "ef14_cyclic_topk2%": ("ours", {"feedback": "ef14", "compressor": "cyclic2"}),
}
QUICK = ["ddp", "fp16_hook", "powersgd_r1", "powersgd_r4", "ef21_topk1%", "ef21_sgdm_topk1%", "econtrol_topk1%",
         "ef21_topk1%_8bit", "ef14_sign"]


# ---------------------------------------------------------------------------------------------------------- worker
def _compressor(name: str):
    from lightning_convergence.compress import QSGD, Compose, CyclicTopK, LowRank, ScaledSign, TopK

    return {
        "topk": lambda: TopK(k_fraction=0.01),
        "topk10": lambda: TopK(k_fraction=0.1),
        "topk8": lambda: Compose(TopK(k_fraction=0.01), QSGD(levels=127, norm="max")),
        "sign": lambda: ScaledSign(),
        "ternary": lambda: QSGD(levels=1, norm="max"),
        "lowrank4": lambda: LowRank(rank=4, rounds=1),
        "lowrank2": lambda: LowRank(rank=2, rounds=1),
        "topk2_8": lambda: Compose(TopK(k_fraction=0.02), QSGD(levels=127, norm="max")),
        "powersgd4": lambda: LowRank(rank=4, rounds=2),
        "powersgd2": lambda: LowRank(rank=2, rounds=2),
        "powersgd8": lambda: LowRank(rank=8, rounds=2),
        "powersgd16": lambda: LowRank(rank=16, rounds=2),
        "powersgd4_8": lambda: LowRank(rank=4, rounds=2, factor_bits=8),
        "powersgd8_8": lambda: LowRank(rank=8, rounds=2, factor_bits=8),
        "powersgd9_8": lambda: LowRank(rank=9, rounds=2, factor_bits=8),
        "powersgd7_8": lambda: LowRank(rank=7, rounds=2, factor_bits=8),
        "cyclic1": lambda: CyclicTopK(k_fraction=0.01),
        "cyclic2": lambda: CyclicTopK(k_fraction=0.02),
    }[name]()


def _strategy(method: str, start_step: int = 0):
    import torch.distributed as dist
    from lightning.pytorch.strategies import DDPStrategy
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    from benchmarks._common import torch_hook_strategy
    from lightning_convergence.strategies.compressed_ddp import CompressedDDPStrategy

    kind, opts = METHODS[method]
    # one bucket for every method: torch's PowerSGD hook is unreliable on gloo with several (shared/NOTES.md)
    common = {"process_group_backend": "gloo", "bucket_cap_mb": 64}
    if kind == "ddp":
        return DDPStrategy(**common)
    if kind == "fp16":
        return torch_hook_strategy(None, default_hooks.fp16_compress_hook, **common)
    if kind == "powersgd":
        def make_state():
            return powerSGD_hook.PowerSGDState(
                process_group=dist.group.WORLD, matrix_approximation_rank=opts["rank"],
                start_powerSGD_iter=max(2, start_step),
                min_compression_rate=2, use_error_feedback=True, warm_start=True, random_seed=0,
            )
        return torch_hook_strategy(make_state, powerSGD_hook.powerSGD_hook, **common)
    return CompressedDDPStrategy(
        feedback=opts["feedback"], compressor=_compressor(opts["compressor"]), start_step=start_step, **common
    )


def _task(task: str, optimizer: str = "adam", lr: float | None = None, schedule: str = "constant",
          steps: int = 0, batch_size: int = 32):

    import torch

    from lightning_convergence.examples import CharTransformerLM, DigitsDataModule, MLPClassifier, StdlibTextDataModule

    if task in ("lm", "lm100"):  # lm100: 6.4M parameters in 102 tensors (the hook-cost model)
        size = {"d_model": 256, "n_layers": 8} if task == "lm100" else {"d_model": 128, "n_layers": 2}
        model = CharTransformerLM(**size, lr=lr or 3e-3)
        data = StdlibTextDataModule(seq_len=64, batch_size=batch_size)
    else:
        model, data = MLPClassifier(hidden=[128, 128], lr=lr or 3e-3), DigitsDataModule(batch_size=batch_size)
    if optimizer.startswith("sgd"):  # SGD (momentum 0.9 or none) for every method (EF21's analysis is for SGD steps)
        sgd_lr = lr or (0.3 if task.startswith("lm") else 0.1)
        momentum = 0.9 if optimizer == "sgd" else 0.0

        def make_opt() -> torch.optim.Optimizer:
            return torch.optim.SGD(model.parameters(), lr=sgd_lr, momentum=momentum)
    else:
        make_opt = model.configure_optimizers
    if schedule == "constant":
        model.configure_optimizers = make_opt
        return model, data
    return with_warmup_cosine(model, steps, make_opt), data


def _recorder(warmup: int):
    from lightning.pytorch import Callback

    class Recorder(Callback):
        def __init__(self) -> None:
            self.losses: list[float] = []
            self.times: list[float] = []
            self.t0 = 0.0
            self.net0 = self.ours0 = self.dense0 = self.dense1 = 0

        def _ours(self, trainer: Any, key: str = "bytes_sent_total") -> int:
            """Our counter summed over the ranks (every rank calls this at the same step: a collective)."""
            import torch
            import torch.distributed as dist

            hs = getattr(trainer.strategy, "hook_state", None)
            if hs is None or not hasattr(hs, "counters"):
                return 0
            t = torch.tensor([float(hs.counters[key])], dtype=torch.float64)
            dist.all_reduce(t)
            return int(t.item())

        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
            if trainer.global_step == warmup:
                self.net0, self.ours0 = lo_tx_bytes(), self._ours(trainer)
                self.dense0 = self._ours(trainer, "dense_bytes_total")
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            self.times.append(time.perf_counter() - self.t0)
            self.losses.append(float(outputs["loss"]))

        def on_train_end(self, trainer: Any, module: Any) -> None:
            self.net1, self.ours1 = lo_tx_bytes(), self._ours(trainer)
            self.dense1 = self._ours(trainer, "dense_bytes_total")

    return Recorder()


def worker(args: argparse.Namespace) -> None:
    import lightning as L
    import torch

    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    for method in args.methods:
        L.seed_everything(args.seed, verbose=False)
        model, data = _task(args.task, args.optimizer, args.lr, args.schedule, args.steps, args.batch_size)
        rec = _recorder(args.warmup)
        trainer = bench_trainer(world, _strategy(method, args.start_step), args.steps, [rec])
        trainer.fit(model, data)
        if rank == 0:
            n = args.steps - args.warmup
            row = {
                "task": args.task, "method": method, "rate": args.rate, "steps": args.steps, "world_size": world,
                "optimizer": args.optimizer, "lr": args.lr, "start_step": args.start_step, "schedule": args.schedule,
                "batch_size": args.batch_size, "seed": args.seed,
                "params": sum(p.numel() for p in model.parameters()),
                "net_bytes_per_step": (rec.net1 - rec.net0) / n,
                # our own counts, summed over the ranks: link bytes sent, and what plain DDP sends at this W
                "our_bytes_per_step": (rec.ours1 - rec.ours0) / n if rec.ours1 else None,
                "our_ddp_bytes_per_step": (rec.dense1 - rec.dense0) / n if rec.dense1 else None,
                "losses": rec.losses, "times": rec.times,
            }
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


# ------------------------------------------------------------------------------------------------------ hook cost
class _FakeBucket:
    """What the hook reads from ``dist.GradBucket``: a flat buffer, its per-parameter views and the parameters."""

    def __init__(self, params: list[Any], buffer: Any) -> None:
        self._params, self._buffer = params, buffer
        self._grads, offset = [], 0
        for p in params:
            self._grads.append(buffer[offset : offset + p.numel()].view_as(p))
            offset += p.numel()

    def buffer(self) -> Any:
        return self._buffer

    def gradients(self) -> list[Any]:
        return self._grads

    def parameters(self) -> list[Any]:
        return self._params


def hook_cost(total: int = 6_400_000, counts: tuple[int, ...] = (10, 100, 300), steps: int = 8) -> None:
    """The hook's own time per step at world size 1 (no communication), for the same number of gradient entries
    split into 10, 100 or 300 square-ish matrices: what the per-parameter work costs as the tensor count grows.
    Single-threaded CPU time of the calling thread (``time.thread_time``): on a shared machine it does not count
    the time other jobs hold the core."""
    import torch

    from lightning_convergence.comm import SingleProcessCommunicator
    from lightning_convergence.feedback import make_rule
    from lightning_convergence.strategies.compressed_ddp import CompressionHookState, compressed_comm_hook

    torch.set_num_threads(1)
    schemes = {"ef14_cyclic_topk1%": ("ef14", "cyclic1"), "ef14_powersgd_r7_8bit": ("ef14", "powersgd7_8"),
               "ef21_topk1%": ("ef21", "topk")}
    print(f"hook CPU time per step (ms), {total} entries, world size 1, 1 thread")
    print(f"{'scheme':<22}" + "".join(f"{n:>10}" for n in counts) + f"{'300/10':>9}")
    for label, (rule_name, comp_name) in schemes.items():
        times = []
        for n in counts:
            side = int((total / n) ** 0.5)
            params = [torch.nn.Parameter(torch.zeros(side, side)) for _ in range(n)]
            names = {id(p): f"p{i}" for i, p in enumerate(params)}
            state = CompressionHookState(make_rule(rule_name, "bench"), _compressor(comp_name), names,
                                         SingleProcessCommunicator())
            gen = torch.Generator().manual_seed(0)
            buf = torch.empty(n * side * side)
            laps = []
            for step in range(steps + 2):
                buf.copy_(torch.randn(buf.numel(), generator=gen))
                bucket = _FakeBucket(params, buf)
                t0 = time.thread_time()
                compressed_comm_hook(state, bucket).wait()
                state.take_nonfinite()
                if step >= 2:  # the first steps send dense (EF21) or warm up
                    laps.append(time.thread_time() - t0)
            times.append(1e3 * sorted(laps)[len(laps) // 2])
        print(f"{label:<22}" + "".join(f"{t:>10.1f}" for t in times) + f"{times[-1] / times[0]:>9.2f}")


# ---------------------------------------------------------------------------------------------------------- parent
def _smooth(xs: list[float], w: int = 10) -> list[float]:
    return [sum(xs[max(0, i - w + 1) : i + 1]) / (i + 1 - max(0, i - w + 1)) for i in range(len(xs))]


def _summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    import statistics

    out = []
    for (task, rate, world) in sorted({(r["task"], r["rate"], r.get("world_size", 2)) for r in rows}):
        group = [r for r in rows if (r["task"], r["rate"], r.get("world_size", 2)) == (task, rate, world)]
        base = next((r for r in group if r["method"] == "ddp"), None)
        if base is None:
            continue
        sb = _smooth(base["losses"])
        target = sb[int(0.75 * len(sb))]
        first = len(out)
        for r in group:
            s = _smooth(r["losses"])
            tail = r["losses"][-max(1, len(r["losses"]) // 10) :]
            cum, ttt = 0.0, None
            for loss, t in zip(s, r["times"]):
                cum += t
                if loss <= target:
                    ttt = cum
                    break
            ours, dense = r.get("our_bytes_per_step"), r.get("our_ddp_bytes_per_step")
            out.append({
                "task": task, "rate": rate, "world_size": world, "method": r["method"],
                "net_bytes": r["net_bytes_per_step"], "our_bytes": ours,
                "logged_ratio": dense / ours if ours and dense else None,
                "step_s": statistics.median(r["times"][1:]), "loss": sum(tail) / len(tail), "ttt_s": ttt,
            })
        b = next(o for o in out[first:] if o["method"] == "ddp")
        for o in out[first:]:
            o["bytes_ratio"] = b["net_bytes"] / max(o["net_bytes"], 1.0)
            o["step_ratio"] = o["step_s"] / b["step_s"]
            o["loss_gap"] = o["loss"] / b["loss"] - 1.0
            o["ttt_ratio"] = (o["ttt_s"] / b["ttt_s"]) if o["ttt_s"] and b["ttt_s"] else None
    return out


def _print_table(summary: list[dict[str, Any]]) -> None:
    header = ["task", "link", "W", "method", "kernel B/step/rank", "DDP/ours kernel", "DDP/ours logged", "step/DDP",
              "loss", "gap", "TTT/DDP"]
    rows = [[o["task"], o["rate"], o["world_size"], o["method"], f"{o['net_bytes'] / o['world_size']:.0f}",
             f"{o['bytes_ratio']:.1f}", f"{o['logged_ratio']:.1f}" if o["logged_ratio"] else "-",
             f"{o['step_ratio']:.2f}", f"{o['loss']:.4f}", f"{100 * o['loss_gap']:+.1f}%",
             f"{o['ttt_ratio']:.2f}" if o["ttt_ratio"] else "-"] for o in summary]
    print_table("compressed DDP, ratios to plain DDP in the same run", header, rows)


def _plot(rows: list[dict[str, Any]], name: str) -> None:
    keys = sorted({(r["task"], r["rate"]) for r in rows})
    with figure(name, 1, len(keys), (6 * len(keys), 4)) as axes:
        if axes is None:
            return
        for ax, (task, rate) in zip(axes[0] if len(keys) > 1 else [axes], keys):
            for r in rows:
                if (r["task"], r["rate"]) == (task, rate):
                    cum, xs = 0.0, []
                    for t in r["times"]:
                        cum += t
                        xs.append(cum)
                    ax.plot(xs, _smooth(r["losses"]), label=r["method"], lw=1)
            ax.set(title=f"{task} @ {rate}", xlabel="cumulative step time (s)", ylabel="train loss (smoothed)")
            ax.legend(fontsize=6)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer steps and methods")
    p.add_argument("--hook-cost", action="store_true",
                   help="only the hook's own time per step for 10, 100, 300 tensors of the same total size")
    p.add_argument("--rates", nargs="+", default=["100mbit"],
                   help="tc rates of the emulated link; 'unlimited': a private namespace without a rate limit")
    p.add_argument("--world-size", nargs="+", type=int, default=[2], help="CPU ranks (one torchrun per value)")
    p.add_argument("--tasks", nargs="+", default=["lm", "classifier"], choices=["lm", "lm100", "classifier"])
    p.add_argument("--methods", nargs="+", default=None, choices=list(METHODS))
    p.add_argument("--steps", type=int, default=None, help="steps per method (default: task-dependent)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-netem", action="store_true", help="run on the host loopback without a rate limit")
    p.add_argument("--optimizer", default="adam", choices=["adam", "sgd", "sgd_plain"],
                   help="adam: the example models' Adam/AdamW; sgd: SGD, momentum 0.9; sgd_plain: SGD, no momentum")
    p.add_argument("--lr", type=float, default=None, help="learning rate override")
    p.add_argument("--schedule", default="constant", choices=["constant", "cosine"],
                   help="learning rate over the run: constant, or 5%% linear warm-up then cosine decay to zero")
    p.add_argument("--batch-size", type=int, default=32, help="per-rank batch size")
    p.add_argument("--seed", type=int, default=0, help="model initialisation and data order (same for all methods)")
    p.add_argument("--start-step", type=int, default=0,
                   help="dense warm-up steps: our strategy's start_step and PowerSGD's start_powerSGD_iter (min 2)")
    # worker-only
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--task", default="lm", help=argparse.SUPPRESS)
    p.add_argument("--rate", default="none", help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    if args.hook_cost:
        hook_cost()
        return

    OUT.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = OUT / f"compressed_ddp-{stamp}.jsonl"
    methods = args.methods or (QUICK if args.quick else list(METHODS))
    steps = {"lm": 60 if args.quick else 150, "lm100": 40, "classifier": 100 if args.quick else 300}
    for rate, task, world in [(r, t, w) for r in args.rates for t in args.tasks for w in args.world_size]:
        argv = torchrun_command(__file__, world, [
            "--worker", "--task", task, "--rate", rate, "--out", str(results),
            "--steps", str(args.steps or steps[task]), "--warmup", str(args.warmup),
            "--optimizer", args.optimizer, "--start-step", str(args.start_step),
            "--schedule", args.schedule, "--batch-size", str(args.batch_size), "--seed", str(args.seed),
            *(["--lr", str(args.lr)] if args.lr else []), "--methods", *methods])
        t0 = time.time()
        # a private namespace (its loopback counts only this run's bytes), capped unless the rate is "unlimited"
        run_on_link(argv, None if rate == "unlimited" else rate, f"{task} @ {rate}, W={world}",
                    namespace=not args.no_netem)
        print(f"[{task} @ {rate}, W={world}: {time.time() - t0:.0f} s]", file=sys.stderr)
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    summary = _summarise(rows)
    _print_table(summary)
    _plot(rows, f"compressed_ddp-{stamp}")
    print(f"\nraw rows: {results}")


if __name__ == "__main__":
    main()
