"""DeMo and 1-bit Adam vs DDP + AdamW (and the best SGD-family compressed recipe) on a rate-limited link, CPU/gloo.

    # the issue's comparison on the char LM, 2 ranks, 600 cosine steps, 100 Mbit/s:
    python benchmarks/adamw_compression.py --task lm --world-sizes 2 --steps 600 \
        --methods ddp_adamw demo onebit_adam sgd_powersgd_r9_8bit
    # a ≥6M-parameter transformer (d_model 384, 4 layers: 7.2M), shorter, smaller batch:
    python benchmarks/adamw_compression.py --task lm7m --world-sizes 2 --steps 150 --batch-size 8 \
        --methods ddp_adamw demo onebit_adam
    # a method's peak learning rate is overridden with name@lr, e.g. demo@1e-3
    # the optimizers' own compute per step (one process, fake collectives, no network):
    python benchmarks/adamw_compression.py --task lm7m --step-compute

For every world size the script creates a fresh network namespace whose loopback is capped by ``tc tbf``
(:mod:`benchmarks._netem`), launches ``torchrun --nproc_per_node=W`` inside it, and the ranks train every method in
turn from the same seed, with the same data order and the same schedule shape (5% linear warm-up, cosine to zero;
each method at its own peak learning rate). Per method:

* link bytes per rank and step counted by the kernel (``/proc/net/dev`` of the namespace's ``lo``, all ranks, divided
  by W), after ``--warmup`` steps; and by our own accounting (``OptimizerCommStrategy.link_bytes_total``);
* final loss: mean training loss over the last 10% of steps; its gap to DDP + AdamW;
* time to target: cumulative step time until the smoothed loss first reaches DDP + AdamW's smoothed loss at 75% of
  its steps; and the median step time.

Ratios are to DDP + AdamW measured in the same run. Without root pass ``--no-netem`` (unlimited host loopback, no
kernel byte count).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import bench_trainer, print_table, run_on_link, torchrun_command, with_warmup_cosine
from benchmarks.compressed_ddp import _recorder as compressed_recorder
from benchmarks.compressed_ddp import _smooth

OUT = Path(__file__).resolve().parent / "out"

# name -> (optimizer, default peak lr, strategy)
METHODS: dict[str, tuple[str, float, str]] = {
    "ddp_adamw": ("adamw", 3e-3, "ddp"),
    "demo": ("demo", 1e-3, "optimizer_comm"),
    "demo_fp32": ("demo_fp32", 1e-3, "optimizer_comm"),
    "onebit_adam": ("onebit_adam", 3e-3, "optimizer_comm"),
    "sgd_powersgd_r9_8bit": ("sgd", 0.2, "ef14_powersgd_r9_8bit"),
}
TASKS = {"lm": dict(d_model=128, n_layers=2, n_heads=4), "lm7m": dict(d_model=384, n_layers=4, n_heads=6)}


# ---------------------------------------------------------------------------------------------------------- worker
def _optimizer(kind: str, params: Any, lr: float, steps: int, onebit_fraction: float) -> Any:
    import torch

    from lightning_convergence.optim import DeMo, OnebitAdam

    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    if kind in ("demo", "demo_fp32"):
        return DeMo(params, lr=lr, momentum_decay=0.999, topk=32, chunk_size=64, weight_decay=0.01,
                    value_dtype="bfloat16" if kind == "demo" else "float32")
    if kind == "onebit_adam":
        return OnebitAdam(params, lr=lr, weight_decay=0.01, start_step=max(1, int(onebit_fraction * steps)))
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


def _strategy(kind: str) -> Any:
    from lightning.pytorch.strategies import DDPStrategy

    from lightning_convergence.strategies import OptimizerCommStrategy

    if kind == "ddp":
        return DDPStrategy(process_group_backend="gloo", bucket_cap_mb=64)
    if kind == "optimizer_comm":
        return OptimizerCommStrategy(process_group_backend="gloo", bucket_cap_mb=64)
    from benchmarks.compressed_ddp import _strategy as compressed_strategy

    return compressed_strategy(kind)


def _model(task: str, method: str, lr: float, steps: int, onebit_fraction: float) -> Any:
    from lightning_convergence.examples import CharTransformerLM

    model = CharTransformerLM(**TASKS[task])
    return with_warmup_cosine(
        model, steps, lambda: _optimizer(METHODS[method][0], model.parameters(), lr, steps, onebit_fraction))


def _recorder(warmup: int) -> Any:
    """compressed_ddp's recorder (losses, step times, kernel bytes), with our strategy's own byte count."""
    rec = compressed_recorder(warmup)

    def ours(trainer: Any, key: str = "bytes_sent_total") -> float:  # the recorder also asks for "dense_bytes_total"
        s = trainer.strategy
        if key == "bytes_sent_total" and hasattr(s, "link_bytes_total"):
            return float(s.link_bytes_total())
        hs = getattr(s, "hook_state", None)  # CompressedDDPStrategy: payload bytes of this rank's all-gathers
        return float(hs.counters.get(key, 0)) if hs is not None and hasattr(hs, "counters") else 0.0

    rec._ours = ours
    return rec


def _parse(spec: str) -> tuple[str, float]:
    name, _, lr = spec.partition("@")
    return name, float(lr) if lr else METHODS[name][1]


def worker(args: argparse.Namespace) -> None:
    import lightning as L
    import torch

    from lightning_convergence.examples import StdlibTextDataModule

    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    for spec in args.methods:
        method, lr = _parse(spec)
        L.seed_everything(args.seed, verbose=False)
        model = _model(args.task, method, lr, args.steps, args.onebit_fraction)
        data = StdlibTextDataModule(seq_len=64, batch_size=args.batch_size)
        rec = _recorder(args.warmup)
        trainer = bench_trainer(world, _strategy(METHODS[method][2]), args.steps, [rec])
        trainer.fit(model, data)
        if rank == 0:
            n = args.steps - args.warmup
            row = {
                "task": args.task, "world_size": world, "method": spec, "lr": lr, "rate": args.rate,
                "steps": args.steps, "batch_size": args.batch_size, "seed": args.seed,
                "params": sum(p.numel() for p in model.parameters()),
                "net_bytes_per_rank_step": (rec.net1 - rec.net0) / n / world,
                "our_bytes_per_rank_step": (rec.ours1 - rec.ours0) / n,
                "losses": rec.losses, "times": rec.times,
            }
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


# ---------------------------------------------------------------------------------------------------------- parent
def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per (task, W, method) with ratios to ddp_adamw and time to its target."""
    out = []
    for task, world in sorted({(r["task"], r["world_size"]) for r in rows}):
        group = [r for r in rows if r["task"] == task and r["world_size"] == world]
        base = next((r for r in group if r["method"].startswith("ddp_adamw")), None)
        if base is None:
            continue
        sb = _smooth(base["losses"])
        target = sb[int(0.75 * len(sb))]
        lines = []
        for r in group:
            tail = r["losses"][-max(1, len(r["losses"]) // 10):]
            cum, ttt = 0.0, None
            for loss, t in zip(_smooth(r["losses"]), r["times"]):
                cum += t
                if loss <= target:
                    ttt = cum
                    break
            lines.append({"task": task, "W": world, "method": r["method"], "params": r["params"],
                          "net_B": r["net_bytes_per_rank_step"], "our_B": r["our_bytes_per_rank_step"],
                          "step_s": statistics.median(r["times"][1:]), "loss": sum(tail) / len(tail), "ttt_s": ttt})
        b = next(o for o in lines if o["method"].startswith("ddp_adamw"))
        for o in lines:
            o["bytes_x"] = b["net_B"] / max(o["net_B"], 1.0)
            o["gap_pct"] = 100.0 * (o["loss"] / b["loss"] - 1.0)
            o["ttt_x"] = o["ttt_s"] / b["ttt_s"] if o["ttt_s"] and b["ttt_s"] else None
        out += lines
    return out


def print_summary(summary: list[dict[str, Any]], target_note: str) -> None:
    rows = [[o["task"], o["W"], o["method"], f"{o['net_B']:.0f}", f"{o['our_B']:.0f}", f"{o['bytes_x']:.1f}",
             f"{o['loss']:.4f}", f"{o['gap_pct']:+.2f}", f"{o['step_s']:.3f}",
             f"{o['ttt_s']:.1f}" if o["ttt_s"] else "never", f"{o['ttt_x']:.2f}" if o["ttt_x"] else "-"]
            for o in summary]
    print_table(target_note, ["task", "W", "method", "kernel B/rank/step", "our B", "DDP/bytes", "loss", "gap %",
                              "step s", "TTT s", "TTT/DDP"], rows)


def step_compute(task: str, repeats: int = 10) -> None:
    """``optimizer.step()`` time alone (one process, one thread), DDP's AdamW vs ours on the compressed path.

    The collectives are in-process fakes for two identical ranks, so this is the optimizers' compute without any
    network: DCT, top-k and decoding for DeMo; sign packing, scattering and scales for 1-bit Adam after the switch.
    """
    import torch

    from lightning_convergence.comm import Communicator, done
    from lightning_convergence.examples import CharTransformerLM
    from lightning_convergence.optim import DeMo, OnebitAdam

    class TwoIdenticalRanks(Communicator):
        world_size = 2

        def all_gather(self, t: Any) -> list:
            return [t, t.clone()]

        def all_to_all_async(self, t: Any) -> Any:
            return done(t.clone())

    torch.manual_seed(0)
    torch.set_num_threads(1)
    ps = list(CharTransformerLM(**TASKS[task]).parameters())
    for p in ps:
        p.grad = torch.randn_like(p)
    fake = TwoIdenticalRanks()

    def ms(opt: Any) -> float:
        opt.step()
        t0 = time.perf_counter()
        for _ in range(repeats):
            opt.step()
        return (time.perf_counter() - t0) / repeats * 1e3

    demo, onebit = DeMo(ps, lr=1e-6, value_dtype="bfloat16"), OnebitAdam(ps, lr=1e-6, start_step=1)
    demo.attach(fake)
    onebit.attach(fake)
    base = ms(torch.optim.AdamW(ps, lr=1e-6))
    d, o = ms(demo), ms(onebit)
    print(f"{task}: {sum(p.numel() for p in ps)} parameters; optimizer.step ms: AdamW {base:.1f}, "
          f"DeMo {d:.1f} ({d / base:.1f}x), 1-bit Adam after the switch {o:.1f} ({o / base:.1f}x)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="lm", choices=list(TASKS))
    p.add_argument("--world-sizes", nargs="+", type=int, default=[2])
    p.add_argument("--methods", nargs="+", default=["ddp_adamw", "demo", "onebit_adam"],
                   help=f"from {list(METHODS)}; name@lr overrides the peak learning rate")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=32, help="per-rank batch size")
    p.add_argument("--warmup", type=int, default=3, help="steps excluded from the byte counts")
    p.add_argument("--onebit-fraction", type=float, default=0.15, help="1-bit Adam start_step as a share of steps")
    p.add_argument("--rate", default="100mbit", help="tc rate of the emulated link")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-netem", action="store_true", help="run on the host loopback without a rate limit")
    p.add_argument("--step-compute", action="store_true", help="only time optimizer.step() in one process")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    if args.step_compute:
        step_compute(args.task)
        return
    for spec in args.methods:
        if _parse(spec)[0] not in METHODS:
            p.error(f"unknown method {spec!r}; choose from {list(METHODS)}")
    OUT.mkdir(parents=True, exist_ok=True)
    results = OUT / f"adamw_compression-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    for world in args.world_sizes:
        argv = torchrun_command(__file__, world, [
            "--worker", "--task", args.task, "--rate", args.rate, "--out", str(results), "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--batch-size", str(args.batch_size), "--seed", str(args.seed),
            "--onebit-fraction", str(args.onebit_fraction), "--methods", *args.methods])
        t0 = time.time()
        run_on_link(argv, None if args.rate == "none" else args.rate, "adamw_compression", namespace=not args.no_netem)
        print(f"[{args.task} W={world} @ {args.rate}: {time.time() - t0:.0f} s]", file=sys.stderr)
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    print_summary(summarise(rows), "target: DDP + AdamW's smoothed training loss at 75% of its steps")
    print(f"\nraw rows: {results}")


if __name__ == "__main__":
    main()
