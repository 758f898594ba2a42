"""Asynchronous FL vs synchronous FedAvg on the digits MLP: time and server updates to a target accuracy.

Simulation mode (``FederatedSimulation``): N virtual clients with speeds spread linearly 1x..10x (a local step of
client n takes ``speed_n`` virtual time units), Dirichlet(alpha) label skew, K local SGD steps of the unchanged
``MLPClassifier.training_step``. Every rule runs in the same process from the same initial model for the same
virtual-time budget; the table gives, per rule, the virtual time, server updates, client updates and wall seconds until
the global model first reaches the target validation accuracy, as ratios to FedAvg measured in the same run, and the
best and final accuracy within the budget. Virtual time is the headline: in simulation the wall time only counts the
compute of one process (it is what a 1-process simulation costs, not what a deployment waits).

    python benchmarks/async_fl.py            # 16 clients
    python benchmarks/async_fl.py --quick    # 8 clients, shorter budget
    python benchmarks/async_fl.py --real     # real processes (AsyncFederatedStrategy), wall time

``--real`` runs the same four rules with ``AsyncFederatedStrategy`` (forked gloo clients on this machine), emulating
the speeds with ``step_delay_s·speed_n`` seconds of sleep per local step, and measures wall seconds and server updates
until the global model (checked after every server update) reaches the target.

``--torchrun`` runs FedBuff and FedAvg as a real launch: two torchrun "nodes" on 127.0.0.1 (c10d rendezvous), each
with ``(clients + 1) / 2`` processes; global rank 0 is the server and every other rank is one client process, with
speeds 1x..10x from ``step_delay_s·speed_n`` sleeps on top of the hardware's own speed. It prints the wall-time table
next to the simulation of the same clients, speeds and rules (virtual time), and the server's link bytes.

    python benchmarks/async_fl.py --torchrun --clients 3
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
import torch.nn.functional as F
from _common import OUT, figure, print_table, torchrun_nodes

from lightning_convergence.examples import DigitsDataModule, MLPClassifier
from lightning_convergence.federated import (
    ClientStream,
    FedAsync,
    FedAvg,
    FedBuff,
    FederatedSimulation,
    FedFix,
    load_params,
    partition_indices,
    speed_factors,
)


class SGDClassifier(MLPClassifier):
    """The digits MLP with plain SGD as its own optimizer (what each client rebuilds every local round)."""

    def __init__(self, lr: float = 0.3) -> None:
        super().__init__(lr=lr)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def make_eval(val_x: torch.Tensor, val_y: torch.Tensor):
    model = SGDClassifier()

    @torch.no_grad()
    def evaluate(params):
        load_params(model, params)
        model.eval()
        logits = model(val_x)
        return {"acc": (logits.argmax(1) == val_y).float().mean().item(), "loss": F.cross_entropy(logits, val_y).item()}

    return evaluate


def run_rule(name, rule, dataset, parts, speeds, args, evaluate, init_state):
    torch.manual_seed(0)
    model = SGDClassifier(lr=args.client_lr)
    model.load_state_dict(init_state)
    streams = [ClientStream(dataset, p, args.batch_size, seed=0, client_id=i) for i, p in enumerate(parts)]
    sim = FederatedSimulation(model, rule, streams, local_steps=args.local_steps, speeds=speeds, eval_fn=evaluate)
    start = time.perf_counter()
    wall_at: dict[int, float] = {}

    def stop(row):
        wall_at[int(row["version"])] = time.perf_counter() - start
        return False

    sim.run(max_time=args.budget, stop=stop)
    hist = sim.history
    hit = next((r for r in hist if r["acc"] >= args.target), None)
    return {
        "name": name, "history": hist,
        "time": hit["time"] if hit else math.nan,
        "versions": hit["version"] if hit else math.nan,
        "client_updates": hit["updates_applied_total"] if hit else math.nan,
        "wall": wall_at.get(int(hit["version"]), math.nan) if hit else math.nan,
        "best": max(r["acc"] for r in hist), "final": hist[-1]["acc"],
        "staleness": rule.metrics()["staleness_steps"],
    }


def run_real(name, rule, n, speeds, args, init_state, val_x, val_y):
    from lightning.pytorch import Callback, Trainer

    from lightning_convergence.data import FederatedDataModule
    from lightning_convergence.strategies.async_fl import AsyncFederatedStrategy

    class TargetStop(Callback):
        def __init__(self):
            self.start, self.rows = time.perf_counter(), []

        @torch.no_grad()
        def on_train_batch_end(self, trainer, pl_module, *unused):
            acc = (pl_module(val_x).argmax(1) == val_y).float().mean().item()
            rule_ = trainer.strategy.rule
            self.rows.append({"time": time.perf_counter() - self.start, "version": rule_.version, "acc": acc,
                              "updates_applied_total": rule_.counters["updates_applied_total"]})
            if acc >= args.target:
                trainer.should_stop = True

    torch.manual_seed(0)
    model = SGDClassifier(lr=args.client_lr)
    model.load_state_dict(init_state)
    data = FederatedDataModule(DigitsDataModule(batch_size=args.batch_size, seed=0), num_clients=n,
                               partition="dirichlet", alpha=args.alpha, seed=0, min_size=args.batch_size // 2)
    strategy = AsyncFederatedStrategy(rule=rule, num_clients=n, local_steps=args.local_steps, speeds=speeds,
                                      step_delay_s=args.step_delay_s, shutdown_timeout_s=5.0,
                                      process_group_timeout_s=300.0)
    stopper = TargetStop()
    trainer = Trainer(strategy=strategy, max_steps=args.max_server_updates, accelerator="cpu", devices=1,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0, callbacks=[stopper], max_time=args.max_wall)
    trainer.fit(model, data)
    if strategy.role == "client":  # a launched client rank: the server reports
        return None
    rows = stopper.rows
    hit = next((r for r in rows if r["acc"] >= args.target), None)
    return {"name": name, "history": rows, "time": hit["time"] if hit else math.nan,
            "versions": hit["version"] if hit else math.nan,
            "client_updates": hit["updates_applied_total"] if hit else math.nan,
            "wall": hit["time"] if hit else math.nan, "best": max(r["acc"] for r in rows),
            "final": rows[-1]["acc"], "staleness": rule.metrics()["staleness_steps"],
            "bytes_sent": strategy.bytes_sent_total, "bytes_received": strategy.bytes_received_total}


def torchrun_worker(args, name, rule, n, speeds, init_state, val_x, val_y) -> None:
    """What every launched process runs; rank 0 writes the result to ``--worker-out``."""
    result = run_real(name, rule, n, speeds, args, init_state, val_x, val_y)
    if result is not None:
        Path(args.worker_out).write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 clients and a shorter budget")
    parser.add_argument("--clients", type=int, default=None)
    parser.add_argument("--alpha", type=float, default=0.3, help="Dirichlet label-skew concentration")
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--client-lr", type=float, default=0.3)
    parser.add_argument("--target", type=float, default=0.90, help="target validation accuracy")
    parser.add_argument("--budget", type=float, default=None, help="virtual time budget")
    parser.add_argument("--real", action="store_true", help="real forked processes; wall time")
    parser.add_argument("--step-delay-s", type=float, default=0.01, help="--real: seconds per local step at 1x")
    parser.add_argument("--max-server-updates", type=int, default=2000, help="--real: cap on server updates")
    parser.add_argument("--max-wall", type=str, default="00:00:02:00", help="--real: cap per rule (DD:HH:MM:SS)")
    parser.add_argument("--torchrun", action="store_true", help="FedBuff vs FedAvg over two torchrun nodes")
    parser.add_argument("--buffer-size", type=int, default=2, help="--torchrun: FedBuff's K")
    parser.add_argument("--torchrun-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torchrun or args.torchrun_worker:
        return main_torchrun(args)
    torch.set_num_threads(1)  # tiny model: intra-op threads only contend on a shared CPU
    n = args.clients or (8 if args.quick else 16)
    args.budget = args.budget or (1500.0 if args.quick else 3000.0)

    dm = DigitsDataModule(seed=0)
    dm.setup("fit")
    train, (val_x, val_y) = dm.train_set, dm.val_set.tensors
    parts = partition_indices(len(train), n, "dirichlet", labels=train.tensors[1], alpha=args.alpha, seed=0,
                              min_size=args.batch_size // 2)
    speeds = speed_factors(n, slowest=10.0, spread="linear")
    evaluate = make_eval(val_x, val_y)
    torch.manual_seed(0)
    init_state = SGDClassifier(lr=args.client_lr).state_dict()
    fast_round = args.local_steps * min(speeds)
    rules = {
        "FedAvg (sync)": FedAvg(num_clients=n),
        "FedAsync a=0.6 poly": FedAsync(alpha=0.6, staleness="polynomial", staleness_a=0.5),
        "FedBuff K=4": FedBuff(buffer_size=4, staleness="polynomial", staleness_a=0.5),
        f"FedFix dt={2 * fast_round:g}": FedFix(period=2 * fast_round, num_clients=n),
    }
    if args.real:
        fast_round_s = args.local_steps * args.step_delay_s * min(speeds)
        del rules[next(k for k in rules if k.startswith("FedFix"))]
        rules[f"FedFix dt={2 * fast_round_s:g}s"] = FedFix(period=2 * fast_round_s, num_clients=n)
        results = [run_real(k, r, n, speeds, args, init_state, val_x, val_y) for k, r in rules.items()]
    else:
        results = [run_rule(k, r, train, parts, speeds, args, evaluate, init_state) for k, r in rules.items()]
    base = results[0]

    def ratio(x, b):
        return x / b if (b and not math.isnan(x) and not math.isnan(b)) else math.nan

    mode = f"real processes, step_delay_s={args.step_delay_s}" if args.real else "simulation"
    title = (f"\nasync FL on digits ({mode}): {n} clients, speeds 1x-10x, Dirichlet alpha={args.alpha}, "
             f"K={args.local_steps} local SGD steps (lr {args.client_lr}, batch {args.batch_size}), target val acc "
             f"{args.target:.2f}" + ("" if args.real else f", virtual-time budget {args.budget:g}"))
    rows = []
    for r in results:
        t_ratio = ratio(r["time"], base["time"])
        rows.append([
            r["name"], f"{r['time']:.1f}" if args.real else f"{r['time']:.0f}", f"{t_ratio:.2f}",
            f"{1 / t_ratio:.2f}x" if t_ratio else "nan",
            f"{r['versions']:.0f}", f"{ratio(r['versions'], base['versions']):.2f}", f"{r['client_updates']:.0f}",
            f"{ratio(r['client_updates'], base['client_updates']):.2f}", f"{r['wall']:.1f}", f"{r['best']:.4f}",
            f"{r['final']:.4f}", f"{r['staleness']:.2f}",
        ])
    print_table(title, ["rule", "t_target", "t/FedAvg", "speedup", "server_upd", "upd/FedAvg", "client_upd",
                        "cu/FedAvg", "wall_s", "best_acc", "final_acc", "stale_mean"], rows)
    with figure(f"async_fl{'_real' if args.real else ''}{'_quick' if args.quick else ''}") as ax:
        if ax is not None:
            for r in results:
                ax.plot([h["time"] for h in r["history"]], [h["acc"] for h in r["history"]], label=r["name"])
            ax.axhline(args.target, color="grey", ls="--", lw=0.8)
            ax.set_xlabel("wall seconds" if args.real else "virtual time")
            ax.set_ylabel("validation accuracy (global model)")
            ax.set_ylim(0, 1)
            ax.legend()


def _two_rules(n: int, k: int) -> dict:
    return {"FedAvg (sync)": lambda: FedAvg(num_clients=n),
            f"FedBuff K={k}": lambda: FedBuff(buffer_size=k, staleness="polynomial", staleness_a=0.5)}


def main_torchrun(args) -> None:
    """FedBuff vs FedAvg with real client processes over two torchrun nodes, next to the simulated figure."""
    torch.set_num_threads(1)
    n = args.clients or 3
    if n % 2 == 0:
        raise SystemExit(f"--torchrun: `--clients` must be odd (server + clients split over 2 nodes), got {n}")
    dm = DigitsDataModule(seed=0)
    dm.setup("fit")
    train, (val_x, val_y) = dm.train_set, dm.val_set.tensors
    speeds = speed_factors(n, slowest=10.0, spread="linear")
    torch.manual_seed(0)
    init_state = SGDClassifier(lr=args.client_lr).state_dict()
    rules = _two_rules(n, args.buffer_size)
    if args.torchrun_worker:
        return torchrun_worker(args, args.torchrun_worker, rules[args.torchrun_worker](), n, speeds, init_state,
                               val_x, val_y)
    real, start_all = [], time.perf_counter()
    out = OUT / "torchrun"
    out.mkdir(parents=True, exist_ok=True)
    for name in rules:
        path = out / f"{name.split()[0]}.json"
        path.unlink(missing_ok=True)
        argv = [a for a in sys.argv[1:] if a != "--torchrun"] + ["--torchrun-worker", name, "--worker-out", str(path)]
        torchrun_nodes(__file__, argv, [(n + 1) // 2] * 2, timeout_s=600)
        real.append(json.loads(path.read_text()))
    wall_all = time.perf_counter() - start_all
    parts = partition_indices(len(train), n, "dirichlet", labels=train.tensors[1], alpha=args.alpha, seed=0,
                              min_size=args.batch_size // 2)
    args.budget = args.budget or 1500.0
    sim = [run_rule(k, r(), train, parts, speeds, args, make_eval(val_x, val_y), init_state) for k, r in rules.items()]
    title = (f"\nasync FL on digits, {n} client processes over 2 torchrun nodes on 127.0.0.1 (server = rank 0), "
             f"speeds {', '.join(f'{s:g}' for s in speeds)} x step_delay_s={args.step_delay_s} s per local step, "
             f"Dirichlet alpha={args.alpha}, K={args.local_steps} local SGD steps, target val acc {args.target:.2f}; "
             f"{wall_all:.0f} s for both launches")
    rows = [[r["name"], f"{r['time']:.1f}", f"{real[0]['time'] / r['time']:.2f}x", f"{r['versions']:.0f}",
             f"{r['client_updates']:.0f}", f"{r['bytes_sent'] / 1e6:.2f}", f"{r['bytes_received'] / 1e6:.2f}",
             f"{s_['time']:.0f}", f"{sim[0]['time'] / s_['time']:.2f}x"] for r, s_ in zip(real, sim)]
    print_table(title, ["rule", "real t_target (s)", "real speedup", "server_upd", "client_upd", "MB sent",
                        "MB received", "sim t_target", "sim speedup"], rows)


if __name__ == "__main__":
    main()
