"""GPU check: every registered strategy of this package, plain DDP and torch's PowerSGD hook on CUDA with NCCL.

    python benchmarks/gpu_check.py                    # all visible GPUs (W = their count; 1 on a one-GPU machine)
    python benchmarks/gpu_check.py --steps 30 --batch-size 8
    python benchmarks/gpu_check.py --device cpu --tiny --steps 4   # the script's own smoke test on CPU (gloo)

Model: GPT-2-small shaped (12 blocks × 768, 12 heads, vocabulary 50257, context 1024, tied embeddings: 124M
parameters; :class:`~lightning_convergence.examples.CharTransformerLM`) on random tokens, ``bf16-mixed``, AdamW.
Each strategy runs in its own process group (``torchrun --nproc_per_node=W`` per strategy, started by this script)
for ``--steps`` optimizer steps; it prints the median step time (CUDA-synchronised, after ``--warmup`` steps) as a
ratio to plain DDP and to torch's ``powerSGD_hook`` (rank 4) measured in the same run, and whether every rank ends
with bit-identical parameters (a float64 checksum per rank, all-gathered). At ``W = 1`` nothing is sent: the ratios
are what each strategy's own computation costs (NOTES.md's target for compressed-DDP hooks: ≤ 1.10).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import OUT, bench_env, print_table, torchrun_command

EXTRA = {  # our recommended settings beyond the registered names: name -> (feedback, compressor arguments)
    "ef14_cyclic_topk1%": ("ef14", "CyclicTopK", {"k_fraction": 0.01}),
    "ef14_powersgd_r7_int8": ("ef14", "LowRank", {"rank": 7, "rounds": 2, "factor_bits": 8}),
}


SKIP = {"async_fl": "needs a federated datamodule (client shards), not a token stream"}


def _registered() -> list[str]:
    from lightning.pytorch.strategies import StrategyRegistry

    import lightning_convergence  # noqa: F401  (registers the strategy names)

    ours = (k for k, v in StrategyRegistry.items() if v["strategy"].__module__.startswith("lightning_convergence"))
    return sorted(k for k in ours if k not in SKIP)


def _strategy(name: str, backend: str) -> Any:
    import torch.distributed as dist
    from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

    from benchmarks._common import torch_hook_strategy
    from lightning_convergence import compress
    from lightning_convergence.strategies.compressed_ddp import CompressedDDPStrategy

    if name == "ddp":
        return DDPStrategy(process_group_backend=backend)
    if name == "torch_powersgd_r4":
        def state() -> Any:
            return powerSGD_hook.PowerSGDState(process_group=dist.group.WORLD, matrix_approximation_rank=4,
                                               start_powerSGD_iter=2, use_error_feedback=True, warm_start=True)

        return torch_hook_strategy(state, powerSGD_hook.powerSGD_hook, process_group_backend=backend)
    if name in EXTRA:
        feedback, cls, kwargs = EXTRA[name]
        return CompressedDDPStrategy(feedback=feedback, compressor=getattr(compress, cls)(**kwargs),
                                     process_group_backend=backend)
    entry = StrategyRegistry[name]
    cls, kwargs = entry["strategy"], dict(entry["init_params"])
    if "process_group_backend" in inspect.signature(cls).parameters:
        kwargs["process_group_backend"] = backend
    return cls(**kwargs)


def worker(args: argparse.Namespace) -> None:
    import lightning as L
    import torch
    import torch.distributed as dist
    from lightning.pytorch import Callback

    from lightning_convergence.examples import CharTransformerLM

    cuda = args.device == "cuda"
    L.seed_everything(0, verbose=False)
    shape = dict(vocab_size=512, seq_len=64, d_model=64, n_layers=2, n_heads=4) if args.tiny else dict(
        vocab_size=50257, seq_len=1024, d_model=768, n_layers=12, n_heads=12)
    model = CharTransformerLM(**shape, lr=3e-4)
    model.head.weight = model.embed.weight  # tied, as GPT-2
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, shape["vocab_size"], (args.batch_size * (args.steps + 2) * 8, shape["seq_len"] + 1),
                           generator=gen)
    data = torch.utils.data.TensorDataset(tokens[:, :-1], tokens[:, 1:])
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size)

    class Timer(Callback):  # per batch and CUDA-synchronised (the harness's StepTimer is neither)
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_batch_start(self, *a: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, *a: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t0)

    timer = Timer()
    world = int(os.environ.get("WORLD_SIZE", 1))
    trainer = L.Trainer(
        accelerator="gpu" if cuda else "cpu", devices=world, strategy=_strategy(args.strategy, args.backend),
        precision="bf16-mixed" if cuda else "32-true", max_steps=args.steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
    )
    trainer.fit(model, loader)
    checksum = torch.tensor([sum(float(p.detach().double().sum()) for p in model.parameters())],
                            dtype=torch.float64, device=trainer.strategy.root_device)
    sums = [torch.zeros_like(checksum) for _ in range(world)]
    if dist.is_initialized() and world > 1:
        dist.all_gather(sums, checksum)
    else:
        sums = [checksum]
    if trainer.global_rank == 0:
        times = sorted(timer.times[args.warmup :]) or [float("nan")]
        row = {"strategy": args.strategy, "world_size": world, "step_s": times[len(times) // 2],
               "replicas_identical": len({float(s) for s in sums}) == 1,
               "params": sum(p.numel() for p in model.parameters())}
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="a 2-block, 64-wide model (smoke test of this script)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per GPU")
    p.add_argument("--world-size", type=int, default=None, help="default: all visible GPUs (2 on CPU)")
    p.add_argument("--strategies", nargs="+", default=None, help="default: ddp, torch_powersgd_r4, ours")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--strategy", default="ddp", help=argparse.SUPPRESS)
    p.add_argument("--backend", default="nccl", help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device visible; pass --device cpu --tiny for the smoke test.")
    world = args.world_size or (torch.cuda.device_count() if args.device == "cuda" else 2)
    backend = "nccl" if args.device == "cuda" else "gloo"
    names = args.strategies or ["ddp", "torch_powersgd_r4", *_registered(), *EXTRA]
    out = OUT / f"gpu_check-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    failed = {}
    for name in names:
        argv = torchrun_command(__file__, world, [
            "--worker", "--strategy", name, "--backend", backend, "--device", args.device, "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--batch-size", str(args.batch_size), "--out", str(out),
            *(["--tiny"] * args.tiny)])
        # captured (not run_on_link): a failing strategy is reported in the table and the others still run
        res = subprocess.run(argv, env=bench_env(), capture_output=True, text=True)
        if res.returncode != 0:
            errors = [line for line in res.stderr.splitlines() if "Error" in line and "Warning" not in line]
            failed[name] = errors[:1] or res.stderr.strip().splitlines()[-1:] or ["?"]
    rows = {r["strategy"]: r for r in map(json.loads, out.read_text().splitlines())} if out.exists() else {}
    ddp, psgd = rows.get("ddp", {}).get("step_s"), rows.get("torch_powersgd_r4", {}).get("step_s")
    print(f"{torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}, W = {world}, "
          f"{next(iter(rows.values()))['params'] if rows else '?'} parameters, torch {torch.__version__}")
    table = []
    for name in names:
        if name in rows:
            r = rows[name]
            vs = [f"{r['step_s'] / b:.2f}" if b else "-" for b in (ddp, psgd)]
            table.append([name, f"{1e3 * r['step_s']:.1f}", *vs, r["replicas_identical"]])
        else:
            table.append([name, "failed", "-", "-", "-"])
    print_table("step time, ratios to plain DDP and torch's PowerSGD (rank 4) in the same run",
                ["strategy", "step ms", "vs DDP", "vs PowerSGD", "replicas equal"], table)
    for name, why in [*((n, f"failed: {f}") for n, f in failed.items()), *SKIP.items()]:
        print(f"{name}: {why}")
    print(f"raw rows: {out}")
    sys.exit(1 if failed or not all(r["replicas_identical"] for r in rows.values()) else 0)


if __name__ == "__main__":
    main()
