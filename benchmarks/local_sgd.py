"""Local SGD vs DDP on the char LM, 2 ranks over an emulated 100 Mbit/s link.

Runs, at equal compute (the same optimizer steps and samples per rank): plain DDP; torch's post-local SGD
(``PostLocalSGDState`` + ``post_localSGD_hook`` registered on CPU + ``PeriodicModelAverager`` via Lightning's
``model_averaging_period``); and ``LocalSGDStrategy`` with each outer step (average, DiLoCo, NoLoCo, CO2) at
H ∈ {8, 32, 128}. Reports sync rounds, counted and on-the-wire bytes, final validation loss (merged model), and
training time to a target loss (1.03 × DDP's final validation loss; validation time excluded), as ratios to DDP
measured in the same run. All runs happen inside one ``torchrun --nproc_per_node=2`` launched in a network namespace
whose loopback is rate-limited (``benchmarks/_netem.py``).

    python benchmarks/local_sgd.py [--quick] [--steps N] [--rate-mbit 100]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import OUT, TrainClock, figure, lo_tx_bytes, print_table, run_on_link, time_to, torchrun_command

MODEL = {"vocab_size": 128, "seq_len": 64, "d_model": 64, "n_layers": 2, "n_heads": 4, "lr": 3e-3}
DATA = {"seq_len": 64, "batch_size": 16, "max_chars": 200_000, "val_fraction": 0.1}


# ----------------------------------------------------------------------------------------------- worker (per rank)
def _runs(quick: bool, steps: int) -> list[dict[str, Any]]:
    hs = [8, 32] if quick else [8, 32, 128]
    outers = ["average", "diloco"] if quick else ["average", "diloco", "noloco", "co2"]
    runs = [{"name": "ddp", "kind": "ddp"}, {"name": "torch_post_local_H32", "kind": "post_local", "H": 32,
                                             "warmup": steps // 8}]
    runs += [{"name": f"{o}_H{h}", "kind": "local", "outer": o, "H": h} for h in hs for o in outers]
    if not quick:  # DiLoCo with a Top-5% pseudo-gradient and error feedback
        runs.append({"name": "diloco_top5%_ef_H32", "kind": "local", "outer": "diloco_topk", "H": 32})
    return runs


def _strategy(run: dict[str, Any], subgroup: Any) -> Any:
    from lightning.pytorch.strategies import DDPStrategy

    if run["kind"] == "ddp":
        return DDPStrategy(process_group_backend="gloo")
    if run["kind"] == "post_local":
        from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import PostLocalSGDState, post_localSGD_hook

        class TorchPostLocalSGD(DDPStrategy):
            def _register_ddp_hooks(self) -> None:  # Lightning registers comm hooks only on CUDA
                self.model.register_comm_hook(self._ddp_comm_state, self._ddp_comm_hook)

        state = PostLocalSGDState(process_group=None, subgroup=subgroup, start_localSGD_iter=run["warmup"])
        return TorchPostLocalSGD(process_group_backend="gloo", ddp_comm_state=state, ddp_comm_hook=post_localSGD_hook,
                                 model_averaging_period=run["H"])
    from lightning_convergence.averaging import CO2, DiLoCo, NoLoCo
    from lightning_convergence.compress import TopK
    from lightning_convergence.strategies.local_sgd import LocalSGDStrategy

    outer = {"average": lambda: "average", "diloco": lambda: DiLoCo(lr=0.7, momentum=0.9),
             "noloco": lambda: NoLoCo(lr=0.7, momentum=0.5), "co2": lambda: CO2(lr=1.0, momentum=0.2),
             "diloco_topk": lambda: DiLoCo(lr=0.7, momentum=0.9, compressor=TopK(k_fraction=0.05))}[run["outer"]]()
    return LocalSGDStrategy(outer=outer, schedule=run["H"], process_group_backend="gloo")


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from lightning.pytorch import Trainer, seed_everything

    from lightning_convergence.examples import CharTransformerLM, StdlibTextDataModule

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    subgroup, _ = dist.new_subgroups(group_size=1)  # torch's post-local hook needs a CPU subgroup (NOTES.md)
    n_params = sum(p.numel() for p in CharTransformerLM(**MODEL).parameters())
    results = []
    for run in _runs(args.quick, args.steps):
        seed_everything(0, verbose=False)
        model = CharTransformerLM(**MODEL)
        data = StdlibTextDataModule(**DATA)
        clock = TrainClock()
        trainer = Trainer(
            accelerator="cpu", devices=2, strategy=_strategy(run, subgroup), max_steps=args.steps, max_epochs=-1,
            val_check_interval=args.val_every, check_val_every_n_epoch=None, num_sanity_val_steps=0,
            logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
            log_every_n_steps=args.steps, callbacks=[clock],
        )
        dist.barrier()
        wire0 = lo_tx_bytes()
        trainer.fit(model, datamodule=data)
        dist.barrier()
        wire = lo_tx_bytes() - wire0
        final = trainer.validate(model, datamodule=data, verbose=False)[0]["val_loss"]
        strategy = trainer.strategy
        if run["kind"] == "local":
            rounds, counted = strategy._rounds, 2 * strategy.bytes_sent_total()  # link bytes, both ranks
        else:
            rounds = args.steps if run["kind"] == "ddp" else run["warmup"] + (args.steps - run["warmup"]) // run["H"]
            counted = rounds * 2 * 4 * n_params  # ring all-reduce of P float32 values at W=2, per round
        results.append({**run, "rounds": rounds, "bytes_counted": counted, "bytes_wire": wire,
                        "train_s": clock.elapsed, "final_val": float(final), "curve": clock.curve,
                        "n_params": n_params})
        if dist.get_rank() == 0:
            print(f"[local_sgd bench] {run['name']}: val {final:.4f} train {clock.elapsed:.1f}s rounds {rounds}",
                  flush=True)
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(results))
    dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------- parent
def report(results: list[dict[str, Any]], args: argparse.Namespace, limited: bool) -> None:
    ddp = next(r for r in results if r["name"] == "ddp")
    post = next(r for r in results if r["kind"] == "post_local")
    target = 1.03 * ddp["final_val"]
    post_target = post["final_val"]  # torch post-local SGD's own final loss: it reaches it by construction
    ddp_t = time_to(ddp["curve"], target)
    post_t = time_to(post["curve"], post_target)
    rows = []
    for r in results:
        t = time_to(r["curve"], target)
        t2 = time_to(r["curve"], post_target)
        rows.append([
            r["name"], r["rounds"], f"{ddp['rounds'] / max(r['rounds'], 1):.1f}x", f"{r['bytes_counted'] / 1e6:.2f}",
            f"{r['bytes_wire'] / 1e6:.2f}", f"{r['final_val']:.4f}", f"{r['final_val'] / ddp['final_val']:.3f}",
            f"{r['train_s']:.1f}", "-" if t is None else f"{t:.1f}",
            "-" if t is None or ddp_t is None else f"{t / ddp_t:.2f}",
            "-" if t2 is None else f"{t2:.1f}", "-" if t2 is None or post_t is None else f"{t2 / post_t:.2f}",
        ])
    link = f"{args.rate_mbit:g} Mbit/s tbf loopback (shared by both ranks)" if limited else "UNTHROTTLED loopback"
    title = (f"Local SGD vs DDP: char LM ({ddp['n_params']} params), 2 ranks, {args.steps} steps each, {link}; "
             f"T1 = 1.03 x DDP final val = {target:.4f}; T2 = torch post-local final val = {post_target:.4f}; "
             "times exclude validation")
    print_table(title, ["run", "sync rounds", "fewer rounds", "MB counted", "MB wire", "final val", "val/DDP",
                        "train s", "t->T1 s", "t->T1/DDP", "t->T2 s", "t->T2/post-local"], rows)
    _plot(results, target)


def _plot(results: list[dict[str, Any]], target: float) -> None:
    with figure("local_sgd", 1, 2, (12, 4)) as grid:
        if grid is not None:
            _draw(grid[0], results, target)


def _draw(axes: Any, results: list[dict[str, Any]], target: float) -> None:
    for r in results:
        steps, times, losses = zip(*r["curve"]) if r["curve"] else ((), (), ())
        style = "k-" if r["kind"] == "ddp" else ("k--" if r["kind"] == "post_local" else "-")
        axes[0].plot(times, losses, style, label=r["name"], linewidth=1)
        axes[1].plot(steps, losses, style, label=r["name"], linewidth=1)
    for ax, xl in zip(axes, ("training wall time (s, validation excluded)", "optimizer step")):
        ax.axhline(target, color="grey", linewidth=0.5)
        ax.set_ylim(top=1.25 * target)  # early high losses would flatten the interesting part
        ax.set_xlabel(xl)
        ax.set_ylabel("val loss (merged model)")
    axes[1].legend(fontsize=6, ncol=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps, H in {8, 32}, average and DiLoCo only")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 256; quick 128)")
    parser.add_argument("--val-every", type=int, default=None, help="validation interval in steps (default 32)")
    parser.add_argument("--rate-mbit", type=float, default=100.0, help="emulated link rate (default 100)")
    parser.add_argument("--no-limit", action="store_true", help="skip the rate limit")
    parser.add_argument("--report-only", action="store_true", help="re-print the table from the last run's JSON")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(OUT / "local_sgd.json"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.steps = args.steps or (128 if args.quick else 256)
    args.val_every = args.val_every or (16 if args.quick else 32)
    if args.worker:
        worker(args)
        return
    if args.report_only:
        report(json.loads(Path(args.out).read_text()), args, not args.no_limit)
        return
    OUT.mkdir(parents=True, exist_ok=True)
    cmd = torchrun_command(Path(__file__).resolve(), 2, ["--worker", f"--steps={args.steps}",
                                                         f"--val-every={args.val_every}", f"--out={args.out}",
                                                         *(["--quick"] if args.quick else [])])
    limited = run_on_link(cmd, f"{args.rate_mbit:g}mbit", "local_sgd", namespace=not args.no_limit)
    report(json.loads(Path(args.out).read_text()), args, limited)


if __name__ == "__main__":
    main()
