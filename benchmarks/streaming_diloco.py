"""Streaming DiLoCo vs DDP, DiLoCo and torch post-local SGD on the char LM over an emulated 100 Mbit/s link.

Runs, at equal compute (same optimizer steps and samples per rank), at world sizes 2 and 4: plain DDP; torch's
post-local SGD (H=32); ``LocalSGDStrategy`` with DiLoCo (H=32); ``StreamingDiLoCoStrategy`` with P=2 fragments,
H=32, τ=4, α=0.5 and 4-bit (E3M0) outer gradients, the same in float32 (peak bytes without quantization), and int8
with eager updates. Reports per rank: link bytes counted under each collective's algorithm; bytes on the wire
(``/proc/net/dev`` of the namespace's loopback, validation excluded, divided by W); the peak link bytes of any one
step; final validation loss of the merged model; training time to a target (1.03 × DDP's final validation loss;
validation excluded); per sync phase (streaming: launch, forward at ⌊τ/2⌋, merge; DiLoCo and post-local SGD: the
averaging step) the median wall time of its steps relative to the median inner step, the worst phase first. Each
world size runs in one ``torchrun`` inside a network namespace whose loopback is rate-limited
(``benchmarks/_netem.py``).

    python benchmarks/streaming_diloco.py [--steps N] [--world-sizes 2,4] [--sync-every H] [--runs fp4,diloco]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    OUT,
    StepTimer,
    TrainClock,
    lo_tx_bytes,
    netem_available,
    print_table,
    run_on_link,
    time_to,
    torchrun_command,
    with_warmup_cosine,
)
from local_sgd import DATA, MODEL

H, P, TAU = 32, 2, 4  # defaults; --sync-every / --fragments / --overlap override them
#: ``--corpus large``: 3.5M characters of stdlib source (these files plus the data module's default 12), so that
#: 1024 steps at W = 4 see each window about 1.3 times and no run is judged while it overfits the 200k default.
LARGE_CORPUS = (
    "typing.py inspect.py subprocess.py tarfile.py ast.py pydoc.py doctest.py difflib.py pickle.py mailbox.py "
    "configparser.py logging/__init__.py unittest/case.py email/message.py http/client.py urllib/request.py "
    "threading.py socket.py ssl.py tempfile.py shutil.py os.py locale.py _pydecimal.py statistics.py random.py "
    "collections/__init__.py turtle.py imaplib.py smtplib.py ftplib.py optparse.py gettext.py csv.py selectors.py "
    "asyncio/base_events.py trace.py pdb.py cmd.py code.py codecs.py tokenize.py traceback.py warnings.py weakref.py "
    "copy.py queue.py sched.py base64.py ipaddress.py plistlib.py platform.py pprint.py glob.py fnmatch.py "
    "fileinput.py shelve.py timeit.py wave.py zipimport.py"
).split()
OUTER_LR = 0.7  # DiLoCo's and streaming DiLoCo's outer Nesterov learning rate; --outer-lr overrides it


def _runs(only: str | None) -> list[dict[str, Any]]:
    runs = [
        {"name": "ddp", "kind": "ddp"},
        {"name": f"torch_post_local_H{H}", "kind": "post_local", "H": H},
        {"name": f"diloco_H{H}", "kind": "local", "outer": "diloco", "H": H},
        {"name": f"streaming_P{P}_H{H}_tau{TAU}_fp4", "kind": "streaming", "quantization": "fp4_e3m0"},
        {"name": f"streaming_P{P}_H{H}_tau{TAU}_fp32", "kind": "streaming", "quantization": None},
        {"name": f"streaming_P{P}_H{H}_tau{TAU}_int8_eager", "kind": "streaming", "quantization": "int8",
         "eager": True},
    ]
    keep = None if only is None else set(only.split(","))
    return [r for r in runs if keep is None or (r["kind"] == "ddp" and "-ddp" not in keep)
            or any(k in r["name"] for k in keep)]


class _StepClock(StepTimer):
    """The harness's step timer, plus the namespace's bytes sent while validating (subtracted from the wire count)."""

    def __init__(self) -> None:
        super().__init__(warmup=0)
        self.val_wire, self._val0 = 0, 0

    def on_validation_start(self, trainer, pl_module):
        super().on_validation_start(trainer, pl_module)
        self._val0 = lo_tx_bytes()

    def on_validation_end(self, trainer, pl_module):
        self.val_wire += lo_tx_bytes() - self._val0  # namespace-wide bytes while validating


def _strategy(run: dict[str, Any], subgroup: Any, steps: int) -> Any:
    from lightning.pytorch.strategies import DDPStrategy

    if run["kind"] == "ddp":
        return DDPStrategy(process_group_backend="gloo")
    if run["kind"] == "post_local":
        from local_sgd import _strategy as local_strategy

        return local_strategy({**run, "warmup": steps // 8}, subgroup)
    if run["kind"] == "local":
        from lightning_convergence.averaging import DiLoCo
        from lightning_convergence.strategies.local_sgd import LocalSGDStrategy

        return LocalSGDStrategy(outer=DiLoCo(lr=OUTER_LR, momentum=0.9), schedule=run["H"],
                                process_group_backend="gloo")
    from lightning_convergence.strategies.streaming_diloco import StreamingDiLoCoStrategy

    return StreamingDiLoCoStrategy(num_fragments=P, sync_every=H, overlap_steps=TAU, mixing=0.5,
                                   eager=run.get("eager", False), quantization=run["quantization"],
                                   outer_lr=OUTER_LR, process_group_backend="gloo")


def _sync_steps(run: dict[str, Any], steps: int, warmup: int) -> dict[str, set[int]]:
    """Steps at which a sync does work, by phase. Streaming: ``launch`` (quantize, start the reduce-scatter),
    ``forward`` (reduce this rank's chunk, start the all-gather; at age ⌊τ/2⌋), ``merge`` (wait, outer step, mix).
    DiLoCo and post-local SGD: ``merge`` (the blocking averaging step)."""
    if run["kind"] == "streaming":
        from lightning_convergence.averaging.streaming import fragment_due

        launch = {s for s in range(1, steps + 1) if fragment_due(s, H, P) is not None}
        return {"launch": launch, "forward": {s + TAU // 2 for s in launch if s + TAU // 2 <= steps},
                "merge": {s + TAU for s in launch if s + TAU <= steps}}
    if run["kind"] in ("local", "post_local"):
        first = warmup if run["kind"] == "post_local" else 0
        return {"merge": {s for s in range(1, steps + 1) if s % H == 0 and s > first}}
    return {}


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from lightning.pytorch import Trainer, seed_everything

    from lightning_convergence.examples import CharTransformerLM, StdlibTextDataModule
    from lightning_convergence.examples.char_lm import DEFAULT_STDLIB_FILES

    data = DATA if args.corpus == "small" else {
        **DATA, "max_chars": 10**8, "files": (*DEFAULT_STDLIB_FILES, *LARGE_CORPUS)}
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    w = dist.get_world_size()
    subgroup, _ = dist.new_subgroups(group_size=1)  # torch's post-local hook needs a CPU subgroup (NOTES.md)
    n_params = sum(p.numel() for p in CharTransformerLM(**MODEL).parameters())
    full = 2 * (w - 1) * 4 * n_params // w  # one float32 ring all-reduce of the model, per rank
    results = []
    for run in _runs(args.runs):
        seed_everything(0, verbose=False)
        model = CharTransformerLM(**{**MODEL, "lr": args.lr})
        if args.schedule == "cosine":
            with_warmup_cosine(model, args.steps)
        clock, steps_clock = TrainClock(), _StepClock()
        trainer = Trainer(
            accelerator="cpu", devices=w, strategy=_strategy(run, subgroup, args.steps), max_steps=args.steps,
            max_epochs=-1, val_check_interval=args.val_every, check_val_every_n_epoch=None, num_sanity_val_steps=0,
            logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
            log_every_n_steps=args.steps, callbacks=[clock, steps_clock],
        )
        dist.barrier()
        wire0 = lo_tx_bytes()
        trainer.fit(model, datamodule=StdlibTextDataModule(**data))
        dist.barrier()
        wire = lo_tx_bytes() - wire0
        val_wire = torch.tensor(float(steps_clock.val_wire))
        dist.broadcast(val_wire, 0)  # rank 0's count of the namespace's bytes during validation
        wire = (wire - val_wire.item()) / w
        final = trainer.validate(model, datamodule=StdlibTextDataModule(**data), verbose=False)[0]["val_loss"]
        s = trainer.strategy
        if run["kind"] in ("local", "streaming"):
            counted, peak = s.bytes_sent_total(), (s._peak_step_bytes if run["kind"] == "streaming" else full)
        else:
            warm = args.steps // 8 if run["kind"] == "post_local" else args.steps
            counted, peak = (warm + (args.steps - warm) // H) * full, full
        phases = _sync_steps(run, args.steps, args.steps // 8)
        sync = set().union(*phases.values())
        inner = [t for k, t in steps_clock.by_step.items() if k not in sync and k > 5]
        by_phase = {ph: 1e3 * statistics.median([steps_clock.by_step[k] for k in ks if k in steps_clock.by_step])
                    for ph, ks in phases.items() if any(k in steps_clock.by_step for k in ks)}
        results.append({**run, "W": w, "n_params": n_params, "bytes_counted": counted, "bytes_wire": wire,
                        "peak_step_bytes": peak, "final_val": float(final), "train_s": clock.elapsed,
                        "curve": clock.curve, "inner_ms": 1e3 * statistics.median(inner),
                        "phase_ms": by_phase})
        if dist.get_rank() == 0:
            ratios = " ".join(f"{ph} {ms / results[-1]['inner_ms']:.2f}x" for ph, ms in by_phase.items())
            print(f"[streaming bench W={w}] {run['name']}: val {final:.4f} train {clock.elapsed:.1f}s "
                  f"inner {results[-1]['inner_ms']:.1f} ms {ratios}", flush=True)
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(results))
    dist.destroy_process_group()


def _phases(r: dict[str, Any]) -> str:
    """The worst sync phase's median step time over the median inner step, then each phase's (launch/forward/merge)."""
    ph = r.get("phase_ms") or {}
    if not ph:
        return "-"
    each = "/".join(f"{ph[k] / r['inner_ms']:.2f}" for k in ("launch", "forward", "merge") if k in ph)
    return f"{max(ph.values()) / r['inner_ms']:.2f}" + (f" ({each})" if len(ph) > 1 else "")


def report(results: list[dict[str, Any]], args: argparse.Namespace, limited: bool) -> None:
    for w in sorted({r["W"] for r in results}):
        rs = [r for r in results if r["W"] == w]
        ddp = next(r for r in rs if r["kind"] == "ddp")
        dil = next((r for r in rs if r["kind"] == "local"), None)
        target = 1.03 * ddp["final_val"]
        dil_t = None if dil is None else time_to(dil["curve"], target)
        rows = []
        for r in rs:
            t = time_to(r["curve"], target)
            rows.append([
                r["name"], f"{r['bytes_counted'] / 1e6:.3f}", f"{r['bytes_wire'] / 1e6:.3f}",
                f"{ddp['bytes_counted'] / r['bytes_counted']:.0f}x", f"{r['peak_step_bytes'] / 1e3:.1f}",
                "-" if dil is None else f"{r['peak_step_bytes'] / dil['peak_step_bytes']:.3f}", f"{r['final_val']:.4f}",
                f"{100 * (r['final_val'] / ddp['final_val'] - 1):+.2f}%", f"{r['train_s']:.1f}",
                "-" if t is None else f"{t:.1f}", "-" if t is None or dil_t is None else f"{t / dil_t:.2f}",
                f"{r['inner_ms']:.1f}", _phases(r),
            ])
        link = f"{args.rate_mbit:g} Mbit/s tbf loopback (shared by all ranks)" if limited else "UNTHROTTLED loopback"
        title = (f"Streaming DiLoCo: char LM ({ddp['n_params']} params, {args.corpus} corpus), W={w}, "
                 f"{args.steps} steps per rank, "
                 f"{args.schedule} inner LR {args.lr:g}, outer LR {OUTER_LR:g}, {link}; "
                 f"target = 1.03 x DDP final val = {target:.4f}; bytes per rank; times exclude validation")
        print_table(title, ["run", "MB counted", "MB wire", "fewer vs DDP", "peak KB/step", "peak/DiLoCo",
                            "final val", "gap vs DDP", "train s", "t->target s", "t->target/DiLoCo",
                            "inner ms", "sync step/inner (L/F/M)"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=256, help="optimizer steps per run (default 256)")
    parser.add_argument("--val-every", type=int, default=32, help="validation interval in steps (default 32)")
    parser.add_argument("--world-sizes", default="2,4", help="comma-separated world sizes (default 2,4)")
    parser.add_argument("--rate-mbit", type=float, default=100.0, help="emulated link rate (default 100)")
    parser.add_argument("--no-limit", action="store_true", help="skip the rate limit")
    parser.add_argument("--report-only", action="store_true", help="re-print the tables from the last run's JSON")
    parser.add_argument("--sync-every", type=int, default=H, help="H for DiLoCo, post-local SGD and streaming (32)")
    parser.add_argument("--fragments", type=int, default=P, help="streaming fragments P (default 2)")
    parser.add_argument("--overlap", type=int, default=TAU, help="streaming overlap steps tau (default 4)")
    parser.add_argument("--corpus", default="small", choices=["small", "large"],
                        help="char LM text: the 200k-character default, or 3.5M characters of stdlib source")
    parser.add_argument("--schedule", default="constant", choices=["constant", "cosine"],
                        help="inner LR of every run: constant, or 5%% linear warm-up then cosine to zero")
    parser.add_argument("--lr", type=float, default=MODEL["lr"], help="inner (and DDP) AdamW peak LR (3e-3)")
    parser.add_argument("--outer-lr", type=float, default=OUTER_LR, help="outer LR of DiLoCo and streaming (0.7)")
    parser.add_argument("--runs", default=None, help="comma-separated name parts to run besides DDP (default: all); "
                        "'-ddp' drops DDP too (losses are printed, no table)")
    parser.add_argument("--tag", default="", help="suffix of the JSON files (keeps runs with other settings apart)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    # the run definitions read them
    globals().update(H=args.sync_every, P=args.fragments, TAU=args.overlap, OUTER_LR=args.outer_lr)
    if args.worker:
        worker(args)
        return
    sizes = [int(x) for x in args.world_sizes.split(",")]
    outs = [OUT / f"streaming_diloco_W{w}{args.tag}.json" for w in sizes]
    if not args.report_only:
        OUT.mkdir(parents=True, exist_ok=True)
        limited = False
        for w, out in zip(sizes, outs):
            cmd = torchrun_command(Path(__file__).resolve(), w, [
                "--worker", f"--steps={args.steps}", f"--val-every={args.val_every}", f"--out={out}",
                f"--sync-every={H}", f"--fragments={P}", f"--overlap={TAU}", f"--schedule={args.schedule}",
                f"--corpus={args.corpus}", f"--lr={args.lr}", f"--outer-lr={OUTER_LR}",
                *([f"--runs={args.runs}"] if args.runs else [])])
            limited = run_on_link(cmd, f"{args.rate_mbit:g}mbit", "streaming_diloco", namespace=not args.no_limit)
    else:
        limited = not args.no_limit and netem_available() is None
    if args.runs is None or "-ddp" not in args.runs.split(","):
        report([r for out in outs for r in json.loads(out.read_text())], args, limited)


if __name__ == "__main__":
    main()
