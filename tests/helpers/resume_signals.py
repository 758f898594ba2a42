"""Resume through Lightning's fault-tolerant paths: the checkpoints written on SIGTERM (``OnExceptionCheckpoint``) and
on SLURM's requeue signal SIGUSR1 (``hpc_ckpt_<n>.ckpt``), each resumed and compared with the straight run by the
harness of :mod:`tests.helpers.resume`."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from tests.helpers.resume import Case, differences, fit


class SignalAt(Callback):
    """Send ``signum`` to this process at the end of the batches that made optimizer steps ``steps``."""

    def __init__(self, signum: int, steps: list[int]) -> None:
        self.signum, self.steps = signum, list(steps)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.steps and trainer.global_step == self.steps[0]:
            self.steps.pop(0)
            os.kill(os.getpid(), self.signum)  # the handler runs here, in the main thread, before the next line


SLURM_ENV = {
    "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "resume-anywhere", "SLURM_NODELIST": "localhost",
}


def sigusr1_resumes(case: Case, root: Path, accumulation: int, world_size: int = 1) -> dict[str, list[str]]:
    """SLURM's requeue path on one process (call with :data:`SLURM_ENV` in the environment): SIGUSR1 after every
    optimizer step makes Lightning write ``hpc_ckpt_<k>.ckpt``; each is resumed, the newest one the way a requeued
    job does it (same ``default_root_dir``, no ``ckpt_path``: Lightning finds the HPC checkpoint itself)."""
    straight = fit(case, root / "straight", world_size, accumulation)
    steps = list(range(1, straight["global_step"]))
    job = root / "job"
    saving = fit(case, job, world_size, accumulation, extra=[SignalAt(signal.SIGUSR1, steps)])
    out = {"signalled run": differences(saving, straight)}
    paths = sorted(job.glob("hpc_ckpt_*.ckpt"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    assert [torch.load(p, weights_only=False)["global_step"] for p in paths] == steps
    for path in paths[:-1]:
        resumed = fit(case, root / f"from-{path.stem}", world_size, accumulation, ckpt_path=str(path))
        out[path.stem] = differences(resumed, straight)
    first_step: list[int] = []
    requeued = fit(case, job, world_size, accumulation, extra=[_FirstStep(first_step)])
    out["requeued job"] = differences(requeued, straight)
    assert first_step == [steps[-1]], first_step  # it did resume from the newest HPC checkpoint
    return out


def sigterm_resumes(case: Case, root: Path, accumulation: int, world_size: int = 1) -> dict[str, list[str]]:
    """Lightning's SIGTERM path on one process: after the signal the batch finishes, ``SIGTERMException`` ends
    ``fit`` and ``OnExceptionCheckpoint`` writes a checkpoint; a fresh run resumes from it (one run per step)."""
    from lightning.pytorch.callbacks import OnExceptionCheckpoint
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    straight = fit(case, root / "straight", world_size, accumulation)
    out: dict[str, list[str]] = {}
    for step in range(1, straight["global_step"]):
        directory = root / f"term{step}"
        saver = OnExceptionCheckpoint(dirpath=directory)
        try:
            fit(case, directory, world_size, accumulation, extra=[SignalAt(signal.SIGTERM, [step])], savers=[saver])
        except SIGTERMException:
            pass
        path = directory / "on_exception.ckpt"
        assert torch.load(path, weights_only=False)["global_step"] == step
        out[f"sigterm-step{step}"] = differences(
            fit(case, root / f"from-term{step}", world_size, accumulation, ckpt_path=str(path)), straight
        )
    return out


class _FirstStep(Callback):
    def __init__(self, out: list[int]) -> None:
        self.out = out

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.out.append(trainer.global_step)
