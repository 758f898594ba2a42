"""Logged link bytes are the communicator's count: DeMo (OptimizerCommStrategy) and streaming DiLoCo at 3 gloo ranks,
each Trainer inside forked ranks that already share a group; streaming's count also against the quantized-mean
formula by hand."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Trainer, seed_everything

from lightning_convergence.comm import TorchDistCommunicator
from lightning_convergence.comm.links import all_reduce_link_bytes, quantized_mean_link_bytes
from tests.helpers.dist import run_processes
from tests.helpers.resume import external_launch_env

TRAINER = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
               enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=1,
               max_epochs=-1)


def _demo(rank: int, world_size: int) -> dict[str, Any]:
    from lightning_convergence.strategies import OptimizerCommStrategy
    from tests.strategies.test_optimizer_comm import _Data, _Model, demo

    external_launch_env(rank, world_size)
    seed_everything(0, verbose=False)
    strategy = OptimizerCommStrategy(method="demo", log_every_n_steps=1, process_group_backend="gloo")
    trainer = Trainer(devices=world_size, strategy=strategy, max_steps=3, **TRAINER)
    trainer.fit(_Model(demo()), _Data())
    opt_comm, hook_comm = strategy.comm_optimizer().comm, strategy.hook_state.comm
    return {
        "logged": float(trainer.callback_metrics["convergence/compress/link_bytes_per_rank_total"]),
        "optimizer": opt_comm.link_bytes_total, "hook": hook_comm.link_bytes_total,
        "torch_dist": isinstance(opt_comm, TorchDistCommunicator) and opt_comm.world_size == world_size,
    }


def test_demo_logs_the_communicators_link_bytes_at_three_ranks():
    for got in run_processes(_demo, 3, timeout_s=240):
        assert got["torch_dist"]
        assert got["optimizer"] > 0 and got["hook"] == 0  # DeMo owns every step: DDP's all-reduce never runs
        assert got["logged"] == got["optimizer"] + got["hook"]  # exact: integers far below 2**24


def _streaming(rank: int, world_size: int) -> dict[str, Any]:
    from lightning_convergence.examples import SyntheticRegressionDataModule
    from lightning_convergence.strategies.streaming_diloco import StreamingDiLoCoStrategy
    from tests.strategies._local_sgd_utils import TinyNet

    external_launch_env(rank, world_size)
    seed_everything(0, verbose=False)
    strategy = StreamingDiLoCoStrategy(num_fragments=2, sync_every=4, overlap_steps=1, quantization="int8",
                                       block_size=8, final_merge=False, process_group_backend="gloo")
    # H=4, P=2: fragment 0 launches after steps 2 and 6, fragment 1 after step 4; each merges one step later, so
    # step 7 is a merge (logged) after which nothing more is sent
    trainer = Trainer(devices=world_size, strategy=strategy, max_steps=7, **{**TRAINER, "limit_val_batches": 1})
    model, data = TinyNet(opt="sgd", lr=0.05), SyntheticRegressionDataModule(n_samples=96, dim=10, batch_size=4, seed=0)
    trainer.fit(model, datamodule=data)  # 8 batches per rank and epoch: no validation within these 7 steps
    m = dict(trainer.callback_metrics)
    after_fit = strategy.bytes_sent_total()
    trainer.validate(model, datamodule=data, verbose=False)  # sets the strategy up again: the count must stay
    return {
        "after_fit": after_fit, "after_validate": strategy.bytes_sent_total(),
        "logged_outer": float(m["convergence/local_sgd/link_bytes_total"]),
        "logged_total": float(m["convergence/local_sgd/bytes_sent_total"]),
        "outer_comm": strategy._outer_comm.link_bytes_total, "comm": strategy._comm.link_bytes_total,
        "fragment_numel": [a.numel() for a in strategy.outer.anchors], "merges": strategy._rounds,
    }


def test_streaming_diloco_logs_the_communicators_link_bytes_at_three_ranks():
    for got in run_processes(_streaming, 3, timeout_s=240):
        n0, n1 = got["fragment_numel"]
        # int8 codes + one float32 scale per 8 entries, reduce-scatter by all-to-all then all-gather, at W=3
        means = 2 * quantized_mean_link_bytes(n0, 3, 8, 8) + quantized_mean_link_bytes(n1, 3, 8, 8)
        assert got["logged_outer"] == means
        # plus, on the same group, the 4-byte non-finite flag that rides with each of the 3 launches (steps 2, 4, 6);
        # no float buffers, and nothing on the default group (no blocking collective at the merges)
        assert got["merges"] == 3 and got["outer_comm"] == means + 3 * all_reduce_link_bytes(4, 3)
        assert got["comm"] == 0
        assert got["logged_total"] == got["outer_comm"] + got["comm"]
        assert got["after_validate"] == got["after_fit"] == got["logged_total"]
