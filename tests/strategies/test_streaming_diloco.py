"""StreamingDiLoCoStrategy on real gloo ranks (ddp_fork): reduction to DiLoCo, identical global state after every
outer step at 2 and 4 ranks, exact resume with a fragment in flight, counted bytes, registration and errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_convergence.averaging import DiLoCo
from lightning_convergence.examples import SyntheticRegressionDataModule
from lightning_convergence.strategies.local_sgd import LocalSGDStrategy
from lightning_convergence.strategies.streaming_diloco import StreamingDiLoCoStrategy, layer_blocks
from tests.helpers.dist import DumpOnRanks, fork_strategy_kwargs, load_rank_results
from tests.strategies._local_sgd_utils import TinyNet, fit, rank_dump


class RecordMerges(Callback):
    """After every optimizer step that merged a fragment, keep the anchors and the merged fragment's parameters."""

    def __init__(self) -> None:
        self.rounds = 0
        self.records: list[dict[str, Any]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        s = trainer.strategy
        if s._rounds == self.rounds:
            return
        self.rounds = s._rounds
        self.records.append({
            "step": s._step,
            "anchors": [a.clone() for a in s.outer.anchors],
            "params": [t.detach().clone() for t in pl_module.parameters()],
        })


def _fit_ranks(out: Path, devices: int, max_steps: int, module: Any = None, **kwargs: Any) -> list[dict[str, Any]]:
    seed_everything(0)
    rec = RecordMerges()

    def dump(trainer, module):
        return {**rank_dump(trainer, module), "records": rec.records}

    trainer = Trainer(
        accelerator="cpu", devices=devices,
        strategy=StreamingDiLoCoStrategy(**fork_strategy_kwargs(), final_merge=False, **kwargs),
        max_steps=max_steps, max_epochs=-1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=1,
        callbacks=[rec, DumpOnRanks(out, dump)], default_root_dir=str(out),
    )
    data = SyntheticRegressionDataModule(n_samples=128, dim=10, batch_size=4, seed=0)
    trainer.fit(module if module is not None else TinyNet(opt="adam", lr=0.01), datamodule=data)
    return load_rank_results(out, devices)


def test_one_fragment_no_overlap_full_precision_equals_diloco_on_two_ranks(tmp_path):
    kw = dict(module_kwargs={"opt": "adam", "lr": 0.01}, final_merge=False)
    ref = fit(LocalSGDStrategy, tmp_path / "ref", 12, outer=DiLoCo(lr=0.7, momentum=0.9), schedule=3, **kw)
    ours = fit(StreamingDiLoCoStrategy, tmp_path / "ours", 12, num_fragments=1, sync_every=3, overlap_steps=0,
               mixing=0.0, quantization=None, **kw)
    for r in range(2):
        for k, v in ref[r]["params"].items():
            assert torch.equal(v, ours[r]["params"][k]), (r, k)  # bit-identical on each rank
        assert ref[r]["strategy_state"]["sync_rounds_total"] == ours[r]["strategy_state"]["sync_rounds_total"] == 4
        torch.testing.assert_close(ref[r]["strategy_state"]["outer"]["anchor"],
                                   torch.cat(ours[r]["strategy_state"]["outer"]["anchors"]), rtol=0, atol=0)


@pytest.mark.parametrize("devices", [2, 4])
@pytest.mark.parametrize("quantization,eager", [(None, False), ("fp4_e3m0", False), ("int8", True)])
def test_global_state_identical_on_every_rank_after_every_outer_step(tmp_path, devices, quantization, eager):
    out = _fit_ranks(tmp_path, devices, 13, num_fragments=2, sync_every=4, overlap_steps=1, mixing=0.0,
                     eager=eager, quantization=quantization, block_size=8)
    records = [o["records"] for o in out]
    assert len(records[0]) == 6  # merges after steps 3, 5, 7, 9, 11, 13 (launches at 2, 4, ..., 12; τ = 1)
    for step_records in zip(*records):
        assert len({rec["step"] for rec in step_records}) == 1
        for a in range(2):  # every fragment's anchor (the global model) is bit-identical across ranks
            for rec in step_records[1:]:
                assert torch.equal(rec["anchors"][a], step_records[0]["anchors"][a])
        if not eager:  # α = 0: the fragment just merged sits on its anchor on every rank
            fragment = 0 if step_records[0]["step"] % 4 == 3 else 1
            idx = [0, 1] if fragment == 0 else [2, 3]  # layer blocks net.0 and net.2
            for rec in step_records[1:]:
                for i in idx:
                    assert torch.equal(rec["params"][i], step_records[0]["params"][i])
    # the replicas really differ outside the merged fragment (the test would be vacuous otherwise)
    assert not torch.equal(records[0][-1]["params"][0], records[1][-1]["params"][0])


@pytest.mark.parametrize("kwargs", [
    dict(num_fragments=2, sync_every=8, overlap_steps=3, quantization="fp4_e3m0", mixing=0.5, block_size=8),
    dict(num_fragments=2, sync_every=4, overlap_steps=1, quantization=None, eager=True),
    dict(num_fragments=2, sync_every=4, overlap_steps=1, quantization="int8", block_size=8,
         module_kwargs={"opt": "adam", "lr": 0.01, "batchnorm": True}),
])
def test_resume_with_a_fragment_in_flight_continues_exactly(tmp_path, kwargs):
    # one epoch = 4 steps per rank; the checkpoint after step 4 holds fragment 0 (first config: stage one of the
    # quantized all-reduce launched at 4) or fragment 1 (second and third: launched at 4, merged at 5; the third
    # also has BatchNorm's running statistics riding with it) in flight; "params" compares the buffers too
    base = dict(module_kwargs={"opt": "adam", "lr": 0.01}, final_merge=False)
    base.update(kwargs)
    straight = fit(StreamingDiLoCoStrategy, tmp_path / "straight", 8, **base)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="first", every_n_train_steps=4, save_top_k=-1)
    fit(StreamingDiLoCoStrategy, tmp_path / "first", 4, callbacks=[ckpt], **base)
    saved = torch.load(tmp_path / "ckpt" / "first.ckpt", weights_only=True)
    assert all(r["outer"]["inflight"] is not None for r in saved["convergence/local_sgd"]["ranks"])
    resumed = fit(StreamingDiLoCoStrategy, tmp_path / "resumed", 8, ckpt_path=str(tmp_path / "ckpt" / "first.ckpt"),
                  **base)
    for r in range(2):
        for k, v in straight[r]["params"].items():
            assert torch.equal(v, resumed[r]["params"][k]), (r, k)
        s, t = straight[r]["strategy_state"], resumed[r]["strategy_state"]
        assert s["step"] == t["step"] == 8 and s["outer"]["link_bytes_total"] == t["outer"]["link_bytes_total"]
        for a, b in zip(s["outer"]["anchors"], t["outer"]["anchors"]):
            assert torch.equal(a, b)
        for a, b in zip(s["outer"]["momentum_buffers"], t["outer"]["momentum_buffers"]):
            assert torch.equal(a, b)


def test_counted_link_bytes_match_hand_computation(tmp_path):
    # TinyNet: net.0 has 10·8+8 = 88 entries, net.2 has 8+1 = 9. fp4, blocks of 8, W=2: 88 entries pad to 96, chunks
    # of 48 = 24 code bytes + 6 scales·4 = 48 bytes; reduce-scatter sends 48, all-gather 48: 96 per sync of
    # fragment 0. Fragment 1: 9 → 16, chunks of 8 = 4 + 4 bytes: 16 per sync. Launches at steps 2,4,6,8 → 2 of each.
    out = fit(StreamingDiLoCoStrategy, tmp_path, 8, module_kwargs={"opt": "adam", "lr": 0.01}, final_merge=False,
              num_fragments=2, sync_every=4, overlap_steps=1, quantization="fp4_e3m0", block_size=8)
    for r in range(2):
        assert out[r]["strategy_state"]["outer"]["link_bytes_total"] == 2 * 96 + 2 * 16
        # the peak step also carries the 4-byte non-finite flag riding with each launch (ring all-reduce, W=2: 4)
        assert out[r]["strategy_state"]["peak_step_bytes"] == 96 + 4
    keys = set(out[0]["metrics"])
    for key in ("link_bytes_total", "fragment_sync_bytes", "peak_step_bytes", "sync_wait_ms", "quantization_error",
                "pseudo_grad_norm", "nonfinite_skipped_total"):
        assert f"convergence/local_sgd/{key}" in keys


def test_layer_blocks_group_by_numbered_block_then_module():
    names = ["pos", "embed.weight", "blocks.layers.0.lin.weight", "blocks.layers.0.lin.bias",
             "blocks.layers.1.lin.weight", "norm.weight", "norm.bias", "head.weight"]
    assert layer_blocks(names) == [[0], [1], [2, 3], [4], [5, 6], [7]]


def test_registered_name_and_errors():
    from lightning.pytorch.strategies import StrategyRegistry

    import lightning_convergence  # noqa: F401  (registers the names)

    assert StrategyRegistry["streaming_diloco"]["init_params"]["quantization"] == "fp4_e3m0"
    with pytest.raises(ValueError, match="`on_nonfinite`"):
        StreamingDiLoCoStrategy(on_nonfinite="ignore")
    with pytest.raises(ValueError, match="`overlap_steps`"):
        StreamingDiLoCoStrategy(num_fragments=4, sync_every=8, overlap_steps=2)


def test_final_merge_drains_the_fragment_in_flight(tmp_path):
    # H=8, P=2, τ=3: fragment 0 launches at step 4 (merged at 7), fragment 1 at step 8 and is still in flight when
    # fit ends; the final merge completes it, then takes one blocking outer step of each fragment: every rank ends on
    # the same model
    out = fit(StreamingDiLoCoStrategy, tmp_path, 8, module_kwargs={"opt": "adam", "lr": 0.01}, final_merge=True,
              num_fragments=2, sync_every=8, overlap_steps=3, quantization="int8", block_size=8)
    for k, v in out[0]["params"].items():
        assert torch.equal(v, out[1]["params"][k]), k
    assert out[0]["strategy_state"]["sync_rounds_total"] == 2  # the merge at step 7, then the final merge
    # link bytes: 88 entries (fragment 0) and 9 (fragment 1) as int8 in blocks of 8 at W=2: chunks of 48 entries =
    # 48 + 6·4 = 72 bytes (96 → 2·72 = 144 per sync), chunks of 8 = 8 + 4 (24 per sync); syncs: fragment 0 at 4,
    # fragment 1 at 8, then both in the final merge
    assert out[0]["strategy_state"]["outer"]["link_bytes_total"] == 2 * 144 + 2 * 24
    assert out[0]["strategy_state"]["outer"]["inflight"] is None


class NaNOnRankOne(TinyNet):
    """Rank 1's loss turns non-finite at the third step, so its replica (and pseudo-gradient) does."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.global_step == 2 and self.global_rank == 1:
            loss = loss * float("nan")
        return loss


@pytest.mark.parametrize("policy, overlap", [("stop", 0), ("skip", 0), ("stop", 1)])
def test_nonfinite_pseudo_gradient_never_enters_the_outer_state(tmp_path, policy, overlap):
    out = _fit_ranks(tmp_path, 2, 8, module=NaNOnRankOne(opt="sgd", lr=0.05), num_fragments=2, sync_every=4,
                     overlap_steps=overlap, quantization="fp4_e3m0", block_size=8, on_nonfinite=policy)
    # rank 1 drops its non-finite step (step 3) before it enters the replica; the finding rides with the next launch
    # (step 4) and is acted on at that fragment's merge (step 4 + τ) on every rank, so both take the same branch
    assert out[1]["strategy_state"]["nonfinite_skipped_total"] >= 1
    for r in range(2):
        state = out[r]["strategy_state"]
        assert state["step"] == (4 + overlap if policy == "stop" else 8)  # 'stop' ends training at that merge
        for t in state["outer"]["anchors"] + state["outer"]["momentum_buffers"]:
            assert torch.isfinite(t).all()


class CountingNet(TinyNet):
    """TinyNet with a float buffer that grows by ``rank + 1`` at every training step (a stand-in for running stats)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.register_buffer("seen", torch.zeros(1))

    def training_step(self, batch, batch_idx):
        self.seen += self.global_rank + 1
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("devices, expected", [(2, [13.0, 14.0]), (3, [17.0, 18.0, 19.0])])
def test_float_buffers_ride_with_the_last_fragment_and_keep_the_change_since_launch(tmp_path, devices, expected):
    # H=4, P=2, τ=1: fragment 1 (the round's last) launches at steps 4 and 8 with the buffers, merging at 5 and 9.
    # Rank r adds r+1 per step. W=2: step 4 sends 4 and 8, mean 6; step 5: 5 and 10, merged to 6+1 = 7 and 6+2 = 8;
    # step 8 sends 10 and 14, mean 12; step 9: 11 and 16, merged to 12+1 = 13 and 12+2 = 14. W=3: step 4 sends 4, 8,
    # 12 (mean 8), step 5 merges to 9, 10, 11; step 8 sends 12, 16, 20 (mean 16), step 9 merges to 17, 18, 19.
    out = _fit_ranks(tmp_path, devices, 9, module=CountingNet(opt="sgd", lr=0.05), num_fragments=2, sync_every=4,
                     overlap_steps=1, quantization=None)
    assert [float(out[r]["params"]["seen"]) for r in range(devices)] == expected
