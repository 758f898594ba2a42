"""What each torchrun worker of the multi-node tests runs (a script, not a test module).

Modes (a comma-separated list, run in order by the same processes, so one launch pays for one ``import lightning``):

* ``fit``: for every registered strategy name in ``--strategies``, fit a tiny least-squares model (fresh seed, the
  same data) and save this rank's final parameters to ``OUT/fit/<name>/rank<k>.pt``.
* ``resume``: each strategy of ``--strategies`` with the elastic-restart recipe (``ModelCheckpoint(dirpath=...,
  save_last=True)`` at epoch ends + ``fit(ckpt_path="last")``), parameters to ``OUT/resume/<name>/rank<k>.pt``; with
  ``--kill-step`` the rank ``--kill-rank`` SIGKILLs itself at that step while fitting the k-th strategy in attempt k
  (``TORCHELASTIC_RESTART_COUNT == k``), so with ``--max-restarts`` = the number of strategies every strategy is
  interrupted once and resumed.
* ``async``: ``AsyncFederatedStrategy`` (FedBuff, constant staleness weight) over the launched ranks for
  ``--async-steps`` server updates; rank 0 records every delta offered to the rule and saves them with the rule's
  counters and final model to ``OUT/async.pt``. After ``fit`` it reuses the launch's gloo group.
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_convergence  # noqa: F401  (registers the strategy names)
from lightning_convergence.data import FederatedDataModule
from lightning_convergence.examples import LinearModel, SyntheticRegressionDataModule
from lightning_convergence.federated import FedBuff
from lightning_convergence.strategies.async_fl import AsyncFederatedStrategy

DIM = 10


class _DumpParams(Callback):
    def __init__(self, path: Path) -> None:
        self.path = path

    def on_fit_end(self, trainer, pl_module) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in pl_module.named_parameters()}
        torch.save({"params": state, "global_step": trainer.global_step},
                   self.path / f"rank{trainer.global_rank}.pt")


class _KillOnce(Callback):
    def __init__(self, step: int, rank: int, attempt: int) -> None:
        self.step, self.rank, self.attempt = step, rank, attempt

    def on_train_batch_end(self, trainer, *unused) -> None:
        attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        if attempt == self.attempt and trainer.global_rank == self.rank and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def _trainer(args, strategy, callbacks, **kw) -> Trainer:
    return Trainer(strategy=strategy, accelerator="cpu", devices=args.devices, num_nodes=args.num_nodes,
                   logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                   num_sanity_val_steps=0, callbacks=callbacks, **kw)


def fit_all(args) -> None:
    for name in args.strategies.split(","):
        seed_everything(0, verbose=False)
        trainer = _trainer(args, name, [_DumpParams(Path(args.out) / "fit" / name)], max_steps=args.steps,
                           enable_checkpointing=False)
        trainer.fit(LinearModel(dim=DIM, lr=0.05), SyntheticRegressionDataModule(n_samples=256, dim=DIM,
                                                                                 batch_size=8))


def resume(args) -> None:
    for index, name in enumerate((args.resume_strategies or args.strategies).split(",")):
        seed_everything(0, verbose=False)
        ckpt = ModelCheckpoint(dirpath=Path(args.ckpt_dir) / name, save_last=True, save_top_k=1, every_n_epochs=1,
                               save_on_train_epoch_end=True)
        callbacks = [ckpt, _DumpParams(Path(args.out) / "resume" / name)]
        if args.kill_step is not None:
            callbacks.append(_KillOnce(args.kill_step, args.kill_rank, attempt=index))
        trainer = _trainer(args, name, callbacks, max_epochs=args.epochs, enable_checkpointing=True)
        trainer.fit(LinearModel(dim=DIM, lr=0.05),
                    SyntheticRegressionDataModule(n_samples=240, dim=DIM, batch_size=8), ckpt_path="last")


def run_async(args) -> None:
    seed_everything(0, verbose=False)
    faults = {int(c): [k, int(n)] for c, k, n in (f.split(":") for f in args.faults.split(",") if f)}
    rule = FedBuff(buffer_size=args.buffer, staleness="constant")
    offered: list[dict] = []
    receive = rule.receive

    def recording_receive(client_id, delta, base_version, now=0.0, update_seq=None):
        ok = receive(client_id, delta, base_version, now=now, update_seq=update_seq)
        offered.append({"client": int(client_id), "seq": int(update_seq), "accepted": bool(ok),
                        "delta": {k: v.detach().clone() for k, v in delta.items()}})
        return ok

    rule.receive = recording_receive
    strategy = AsyncFederatedStrategy(rule=rule, num_clients=args.clients, local_steps=2, faults=faults,
                                      shutdown_timeout_s=3.0, process_group_timeout_s=90.0, serve_timeout_s=60.0)
    data = FederatedDataModule(SyntheticRegressionDataModule(n_samples=128, dim=DIM, batch_size=8),
                               num_clients=args.clients, seed=0)
    model = LinearModel(dim=DIM, lr=0.05)
    init = {k: v.detach().clone() for k, v in model.named_parameters()}
    trainer = _trainer(args, strategy, [], max_steps=args.async_steps, enable_checkpointing=False)
    trainer.fit(model, data)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if strategy.role == "server":
        torch.save({"init": init, "final": {k: v.detach().clone() for k, v in model.named_parameters()},
                    "rule_params": rule.global_params(), "counters": dict(rule.counters), "version": rule.version,
                    "pending": rule.pending, "participation": dict(rule.participation), "offered": offered,
                    "deaths": dict(strategy.deaths), "stalled": sorted(strategy.stuck_clients),
                    "global_step": trainer.global_step}, out / "async.pt")
    else:
        torch.save({"updates_sent": strategy.updates_sent}, out / f"client_rank{trainer.global_rank}.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("modes", help="comma-separated: fit, resume, async (run in this order)")
    parser.add_argument("--strategies", default="ddp")
    parser.add_argument("--resume-strategies", default=None, help="for `resume` (default: --strategies)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--async-steps", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--ckpt-dir", default=None)
    parser.add_argument("--kill-step", type=int, default=None)
    parser.add_argument("--kill-rank", type=int, default=1)
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--buffer", type=int, default=2)
    parser.add_argument("--faults", default="", help="client:kind:after_updates,...")
    args = parser.parse_args()
    torch.set_num_threads(1)
    modes = args.modes.split(",")
    for mode in modes:
        {"fit": fit_all, "resume": resume, "async": run_async}[mode](args)
    if "async" not in modes and dist.is_initialized():  # no collective or gloo thread left running at shutdown
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
