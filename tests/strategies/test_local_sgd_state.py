"""Buffers and inner-optimizer state at a sync (keep / average / reset), and the late-merging schedules, on 2 ranks."""

from __future__ import annotations

import pytest
import torch

from lightning_convergence.averaging import SingleFinalMerge
from lightning_convergence.strategies.local_sgd import LocalSGDStrategy
from tests.strategies._local_sgd_utils import fit

ADAM_BN = {"opt": "adam", "lr": 0.01, "batchnorm": True}


def _moments(dump):
    return torch.cat([s["exp_avg"].flatten() for _, s in sorted(dump["optimizer"]["state"].items())])


def _bn(dump):
    return dump["params"]["net.1.running_mean"]


@pytest.mark.parametrize("mode", ["keep", "average", "reset"])
def test_local_sgd_optimizer_state_and_buffers_at_sync(tmp_path, mode):
    # 6 steps, H=3: the run ends right after a sync, before any further local step
    out = fit(LocalSGDStrategy, tmp_path / mode, 6, outer="average", schedule=3, optimizer_state=mode,
              sync_buffers=(mode != "keep"), final_merge=False, module_kwargs=ADAM_BN)
    r0, r1 = out
    for k, v in r0["params"].items():
        if k.endswith("weight") or k.endswith("bias"):
            assert torch.equal(v, r1["params"][k]), k  # parameters were just averaged
    if mode == "keep":
        assert not torch.equal(_moments(r0), _moments(r1))  # each rank keeps its own Adam moments
        assert not torch.equal(_bn(r0), _bn(r1))  # sync_buffers=False: BatchNorm statistics stay per rank
    elif mode == "average":
        assert torch.equal(_moments(r0), _moments(r1))
        assert torch.equal(_bn(r0), _bn(r1))
    else:
        assert r0["optimizer"]["state"] == {} and r1["optimizer"]["state"] == {}
        assert torch.equal(_bn(r0), _bn(r1))


def test_local_sgd_single_final_merge_schedule_communicates_once(tmp_path):
    out = fit(LocalSGDStrategy, tmp_path / "single", 6, outer="average", schedule=SingleFinalMerge(total_steps=6))
    assert out[0]["strategy_state"]["sync_rounds_total"] == 1
    for k, v in out[0]["params"].items():
        assert torch.equal(v, out[1]["params"][k]), k


def test_lightning_still_calls_the_private_methods_local_sgd_overrides():
    """Fails if Lightning renames `_setup_model` / `_register_ddp_hooks` or stops calling them from `configure_ddp`:
    then the module would be wrapped in DDP and the local phase would all-reduce gradients."""
    import inspect

    from lightning.pytorch.strategies import DDPStrategy

    source = inspect.getsource(DDPStrategy.configure_ddp)
    assert "self._setup_model(" in source and "self._register_ddp_hooks()" in source
    for name in ("_setup_model", "_register_ddp_hooks"):
        assert callable(getattr(DDPStrategy, name, None)), name
        assert getattr(LocalSGDStrategy, name) is not getattr(DDPStrategy, name), name
    module = torch.nn.Linear(2, 1)
    assert LocalSGDStrategy()._setup_model(module) is module  # never wrapped


def test_a_nonfinite_gradient_on_one_rank_in_the_ddp_warmup_is_dropped_on_every_rank(tmp_path):
    """In the DDP warm-up every rank joins the gradient all-reduce; a rank whose gradient is non-finite must not skip
    it (the others would wait for it), and every rank drops that step, so the replicas stay identical."""
    import warnings

    from lightning.pytorch import Trainer, seed_everything

    from lightning_convergence.averaging import FixedPeriod
    from lightning_convergence.examples import SyntheticRegressionDataModule
    from tests.helpers.dist import DumpOnRanks, fork_strategy_kwargs, load_rank_results
    from tests.strategies._local_sgd_utils import TinyNet, rank_dump

    class NaNOnRankOneAtStep1(TinyNet):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("nan") if self.global_step == 1 and self.global_rank == 1 else loss

    seed_everything(0)
    strategy = LocalSGDStrategy(schedule=FixedPeriod(2, start_step=4), on_nonfinite="skip", **fork_strategy_kwargs())
    trainer = Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=3, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      limit_val_batches=0, num_sanity_val_steps=0, callbacks=[DumpOnRanks(tmp_path, rank_dump)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(NaNOnRankOneAtStep1(), datamodule=SyntheticRegressionDataModule(n_samples=64, dim=10,
                                                                                     batch_size=8, seed=0))
    ranks = load_rank_results(tmp_path, 2)
    for r in ranks:
        assert r["strategy_state"]["nonfinite_skipped_total"] == 1  # the one bad step, dropped on both ranks
        assert all(torch.isfinite(v).all() for v in r["params"].values())
    for k, v in ranks[0]["params"].items():  # three warm-up (DDP) steps: the replicas never diverged
        assert torch.equal(v, ranks[1]["params"][k]), k
