"""Resume from any step is exact, for every part of the registry (:mod:`tests.contract.parts`): each public callback
and each registered strategy, at 1 and 2 ranks, with accumulation 1 and 2, in epoch-based and ``max_steps`` runs,
checkpointed by Lightning's ``ModelCheckpoint`` after every optimizer step, at every training epoch's end and at every
end-of-epoch validation; each resumed run (fresh Trainer, module, callbacks, strategy) must end bit-identical to the
run that never stopped: parameters, optimizer and scheduler state, and the part's own state (issue #21). The run that
wrote the checkpoints must also equal the run that wrote none (saving has no side effect).

Also covered: the case filed in issue #21 (AdaptiveBatchSize resumed from an epoch-end checkpoint), a resume in a
fresh Python process through the CLI entry point, the checkpoints Lightning's fault-tolerant path writes on SIGTERM
(``OnExceptionCheckpoint``) and on the SLURM requeue signal SIGUSR1 (the ``hpc_ckpt_<n>.ckpt`` a preempted job
leaves), and ``async_fl`` (its own process model).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.strategies import StrategyRegistry

from tests.contract.parts import PARTS
from tests.helpers.dist import run_processes
from tests.helpers.resume import (
    EPOCHS,
    STEPS_PER_EPOCH,
    differences,
    external_launch_env,
    fit,
    issue_fit,
    resume_everywhere,
    step_savers,
)
from tests.helpers.resume_signals import SLURM_ENV, sigterm_resumes, sigusr1_resumes

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.filterwarnings("ignore::UserWarning"),  # Lightning's resume/worker/log advice on tiny runs
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

ANYWHERE = sorted(n for n, p in PARTS.items() if p.resume == "anywhere")


def _assert_exact(results: dict[str, list[str]]) -> None:
    bad = {label: diffs[:4] for label, diffs in results.items() if diffs}
    assert not bad, f"resumed runs differ from the straight run: {bad}"
    assert len(results) >= 2  # at least two runs (resumed or signalled) were compared


def _worker(rank: int, world_size: int, name: str, root: str, accumulation: int, stop: str,
            ) -> dict[str, list[str]]:
    external_launch_env(rank, world_size)
    warnings.simplefilter("ignore")
    return resume_everywhere(PARTS[name].case, Path(root), world_size, accumulation, stop)


# Each world size runs accumulation 1 and 2, and an epoch-based and an iteration-based (`max_steps`) run, where
# Lightning restores its loops differently (it calls `on_train_epoch_end` again, and sets the sampler epoch one ahead).
# Always in forked processes, world size 1 included: a DDP-type strategy run in the pytest process itself leaves
# state behind that hangs later ddp_fork tests.
_SHAPES = [(1, 1, "epochs"), (1, 2, "steps"), (2, 1, "steps"), (2, 2, "epochs")]


@pytest.mark.parametrize(("world_size", "accumulation", "stop"), _SHAPES,
                         ids=[f"{w}rank-acc{a}-{s}" for w, a, s in _SHAPES])
@pytest.mark.parametrize("name", ANYWHERE)
def test_part_resumes_exactly_from_every_step(name, world_size, accumulation, stop, tmp_path):
    for rank_results in run_processes(_worker, world_size, name, str(tmp_path), accumulation, stop):
        _assert_exact(rank_results)


# -- the case filed in issue #21 ---------------------------------------------------------------------------------
def _issue_case(rank: int, world_size: int, root: str) -> list[str]:
    if world_size > 1:
        external_launch_env(rank, world_size)
    warnings.simplefilter("ignore")
    base = Path(root)
    straight = issue_fit(base / "straight", world_size)
    issue_fit(base, world_size, save=True)
    ckpt = sorted((base / "ckpt").glob("epoch=0*.ckpt"))
    assert len(ckpt) == 1
    resumed = issue_fit(base / "resumed", world_size, ckpt_path=str(ckpt[0]))
    return differences(resumed, straight)


@pytest.mark.parametrize("world_size", [1, 2])
def test_issue_21_adaptive_batch_resumes_exactly_from_the_end_of_epoch_0(world_size, tmp_path):
    """Before the fix the resumed run's last step of epoch 1 read the wrong examples (the sampler skipped the 64
    examples epoch 0 had consumed, in epoch 1's order): weights off by ~5e-3, momentum by ~0.1."""
    if world_size == 1:
        assert _issue_case(0, 1, str(tmp_path)) == []
        return
    assert run_processes(_issue_case, 2, str(tmp_path)) == [[], []]


# -- checkpoints written by Lightning's fault-tolerant path ------------------------------------------------------
# A part that owns its sampler and one with per-rank strategy state (the signal paths are Lightning's, not the parts').
_SIGNAL_CASES = ["AdaptiveBatchSize", "diloco"]


def _slurm_env(rank: int, world_size: int) -> dict[str, str]:
    """What ``srun`` sets for task ``rank`` of ``world_size`` on one node."""
    ntasks = str(world_size)
    return {**SLURM_ENV, "SLURM_NTASKS": ntasks, "SLURM_NTASKS_PER_NODE": ntasks, "SLURM_PROCID": str(rank),
            "SLURM_LOCALID": str(rank)}


def _signal_worker(rank: int, world_size: int, kind: str, name: str, root: str) -> dict[str, list[str]]:
    warnings.simplefilter("ignore")
    external_launch_env(rank, world_size)
    if kind == "sigusr1":
        os.environ.update(_slurm_env(rank, world_size))
        return sigusr1_resumes(PARTS[name].case, Path(root), 2, world_size)
    return sigterm_resumes(PARTS[name].case, Path(root), 2, world_size)


def _run_signal(kind: str, name: str, world_size: int, root: Path, monkeypatch) -> None:
    for rank_results in run_processes(_signal_worker, world_size, kind, name, str(root)):
        _assert_exact(rank_results)


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="POSIX signals")
@pytest.mark.parametrize("world_size", [1, 2], ids=["1rank", "2ranks"])
@pytest.mark.parametrize("name", _SIGNAL_CASES)
def test_slurm_requeue_checkpoint_on_sigusr1_resumes_exactly(name, world_size, tmp_path, monkeypatch):
    """SIGUSR1 after every optimizer step (accumulation 2): Lightning's SLURM handler writes hpc_ckpt_<k>.ckpt (its
    `scontrol requeue` call fails harmlessly here); the newest is picked up by a requeued run on its own."""
    _run_signal("sigusr1", name, world_size, tmp_path, monkeypatch)


@pytest.mark.skipif(not hasattr(signal, "SIGTERM"), reason="POSIX signals")
@pytest.mark.parametrize("world_size", [1, 2], ids=["1rank", "2ranks"])
@pytest.mark.parametrize("name", _SIGNAL_CASES)
def test_checkpoint_written_on_sigterm_resumes_exactly(name, world_size, tmp_path, monkeypatch):
    """SIGTERM (to every rank, as a preempted job gets it) after optimizer step k: the batch finishes, fit ends with
    SIGTERMException and OnExceptionCheckpoint writes the checkpoint; one run per k (accumulation 2)."""
    _run_signal("sigterm", name, world_size, tmp_path, monkeypatch)


# -- a resume in a fresh Python process, through the CLI ---------------------------------------------------------
def test_cli_resume_in_a_fresh_process_is_exact(tmp_path):
    """AdaptiveBatchSize (accumulation 2) saved in-process at step 2 and at the end of epoch 0, then resumed by
    ``python -m lightning_convergence fit --ckpt_path ...`` in a new interpreter: nothing process-global (RNG,
    module caches, the sampler's controller) carries the state."""
    case = PARTS["AdaptiveBatchSize"].case
    straight = fit(case, tmp_path / "straight", 1, 2)
    fit(case, tmp_path / "saving", 1, 2, savers=step_savers(tmp_path / "ckpt"))
    config = {
        "seed_everything": False,
        "model": {"class_path": "tests.helpers.resume.TinyNet", "init_args": {"world_size": 1, "accumulation": 2}},
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_epochs": EPOCHS, "accumulate_grad_batches": 2,
            "limit_train_batches": 2 * STEPS_PER_EPOCH, "limit_val_batches": 0, "num_sanity_val_steps": 0,
            "logger": False, "enable_progress_bar": False, "enable_model_summary": False,
            "enable_checkpointing": False, "deterministic": True, "log_every_n_steps": 1,
            "callbacks": [
                {"class_path": "lightning_convergence.callbacks.AdaptiveBatchSize",
                 "init_args": {"max_batch_size": 64, "variance_estimator": "microbatch", "smoothing": 0.5}},
                {"class_path": "tests.helpers.resume.SaveSnapshot", "init_args": {"path": "PATH"}},
            ],
        },
    }
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    for name in ("step2", "epoch0-step2-end"):
        out = tmp_path / f"{name}.pt"
        config["trainer"]["callbacks"][1]["init_args"]["path"] = str(out)
        config["trainer"]["default_root_dir"] = str(tmp_path / f"cli-{name}")
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump(config))
        cmd = [sys.executable, "-m", "lightning_convergence", "fit", "--config", str(cfg),
               "--ckpt_path", str(tmp_path / "ckpt" / f"{name}.ckpt")]
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=100)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert differences(torch.load(out, weights_only=False), straight) == []


# -- async_fl: its own process model -----------------------------------------------------------------------------
@pytest.mark.parametrize("num_clients", [1, 2])
def test_async_fl_resumes_at_every_server_step(num_clients, tmp_path):
    """The registered ``async_fl`` strategy class with a round-based rule (FedAvg: every round waits for all
    clients, so the run is deterministic) and 1 or 2 forked clients: a checkpoint after every server step and at
    every epoch end resumes to the same global model and rule state. Accumulation does not apply (clients run a
    manual loop, the server's optimizer never steps). The asynchronous rules are not bit-exact across a resume by
    design: updates in flight when the checkpoint is written are not part of it (the strategy's Deviations)."""
    from lightning.pytorch import Trainer

    from lightning_convergence.data import FederatedDataModule
    from lightning_convergence.examples import LinearModel, SyntheticRegressionDataModule
    from lightning_convergence.federated import FedAvg

    strategy_cls = StrategyRegistry["async_fl"]["strategy"]

    def run(root: Path, ckpt_path: str | None = None, save: bool = False) -> dict:
        strategy = strategy_cls(rule=FedAvg(num_clients=num_clients), num_clients=num_clients, local_steps=2)
        data = FederatedDataModule(SyntheticRegressionDataModule(n_samples=64, dim=3, batch_size=4),
                                   num_clients=num_clients, seed=0, server_steps_per_epoch=2)
        savers = step_savers(root / "ckpt") if save else []
        trainer = Trainer(
            strategy=strategy, max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
            enable_model_summary=False, enable_checkpointing=save, limit_val_batches=0, num_sanity_val_steps=0,
            default_root_dir=str(root), callbacks=savers,
        )
        model = LinearModel(dim=3, lr=0.05)
        trainer.fit(model, data, ckpt_path=ckpt_path)
        rule = dict(strategy.rule.state_dict())
        rule.pop("clock")  # wall-clock seconds of the run (a timing, not training state)
        return {"global_step": trainer.global_step, "rule": rule,
                "params": {k: v.detach().clone() for k, v in model.state_dict().items()}}

    straight = run(tmp_path / "straight")
    assert straight["global_step"] == 4
    results = {"saving run": differences(run(tmp_path, save=True), straight)}
    for path in sorted((tmp_path / "ckpt").glob("*.ckpt")):
        if torch.load(path, weights_only=False)["global_step"] < 4:
            results[path.stem] = differences(run(tmp_path / path.stem, ckpt_path=str(path)), straight)
    _assert_exact(results)
    assert len(results) == 5  # steps 1-3 and the end of epoch 0
