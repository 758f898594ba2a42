"""CompressedDDPStrategy with two real gloo ranks (ddp_fork): reductions to DDP, convergence, bytes, buckets, resume."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_convergence._metrics import KEY_PATTERN
from lightning_convergence.compress import Identity, LowRank, RandK, TopK
from lightning_convergence.examples import LinearModel, MLPClassifier, SyntheticRegressionDataModule
from lightning_convergence.feedback import EF21SGDM
from lightning_convergence.strategies.compressed_ddp import CompressedDDPStrategy
from tests.helpers.dist import DumpOnRanks, ddp_fork_strategy, fork_strategy_kwargs, load_rank_results, params_snapshot

TRAINER = dict(
    accelerator="cpu", devices=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
    num_sanity_val_steps=0, limit_val_batches=0,
)


def _dump(trainer, module):
    s = trainer.strategy
    out = {"params": params_snapshot(module), "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()}}
    if isinstance(s, CompressedDDPStrategy):
        out["rule"] = s.rule.state_dict()
        out["compressor"] = s.compressor.state_dict()
        out["counters"] = dict(s.hook_state.counters)
    return out


class _MLPData(L.LightningDataModule):
    """Deterministic random inputs for the MLP classifier (64 features, 10 classes)."""

    def __init__(self, n: int = 64, batch_size: int = 8) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        x, y = torch.randn(n, 64, generator=gen), torch.randint(0, 10, (n,), generator=gen)
        self.ds = torch.utils.data.TensorDataset(x, y)
        self.batch_size = batch_size

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.ds, batch_size=self.batch_size, shuffle=False)


def fit(tmp: Path, strategy, *, mlp: bool = False, callbacks=(), ckpt_path=None, **kwargs):
    L.seed_everything(0, verbose=False)
    if mlp:
        model, data = MLPClassifier(hidden=[16, 16], lr=0.05), _MLPData()
        if kwargs.pop("sgd", False):  # Adam's first step is sign-like: it turns 1e-9 float noise into lr-sized steps
            model.configure_optimizers = lambda: torch.optim.SGD(model.parameters(), lr=0.05)
    else:
        model = LinearModel(dim=10, lr=kwargs.pop("lr", 0.05))
        data = kwargs.pop("data", None) or SyntheticRegressionDataModule(n_samples=128, dim=10, batch_size=16)
    opts = {**TRAINER, "enable_checkpointing": False, **kwargs}
    trainer = L.Trainer(strategy=strategy, callbacks=[*callbacks, DumpOnRanks(tmp, _dump)], **opts)
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return load_rank_results(tmp, 2)


def ours(feedback="ef21", compressor=None, **kwargs):
    return CompressedDDPStrategy(feedback=feedback, compressor=compressor, **fork_strategy_kwargs(), **kwargs)


def _assert_params_close(a, b, atol):
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol), (k, (a[k] - b[k]).abs().max())


@pytest.fixture(scope="module")
def plain_mlp(tmp_path_factory):
    return fit(tmp_path_factory.mktemp("plain"), ddp_fork_strategy(), mlp=True, max_steps=6)


@pytest.mark.parametrize("feedback", ["none", "ef14", "ef21", "ef21_sgdm", "econtrol"])
def test_identity_compressor_equals_plain_ddp(tmp_path, plain_mlp, feedback):
    rule = EF21SGDM(momentum=1.0) if feedback == "ef21_sgdm" else feedback  # momentum < 1 filters: not DDP
    # several buckets (1 KiB each) on a 3-layer MLP: the hook handles any bucketing, before and after DDP's rebuild
    got = fit(tmp_path, ours(rule, Identity(), bucket_cap_mb=0.001), mlp=True, max_steps=6)
    for rank in range(2):
        # float32: EF21-type rules carry g = g + mean(grad - g_i), which rounds differently from mean(grad)
        _assert_params_close(got[rank]["params"], plain_mlp[rank]["params"], atol=1e-5)
    assert got[0]["counters"]["hook_calls_total"] > 6  # more than one bucket per step


@pytest.mark.parametrize("make", [lambda: TopK(0.1), lambda: LowRank(rank=2)], ids=["topk", "lowrank"])
def test_compressed_result_does_not_depend_on_bucketing(tmp_path, make):
    one = fit(tmp_path / "one", ours("ef21", make(), bucket_cap_mb=25), mlp=True, max_steps=5)
    many = fit(tmp_path / "many", ours("ef21", make(), bucket_cap_mb=0.001), mlp=True, max_steps=5)
    assert one[0]["counters"]["hook_calls_total"] == 5 < many[0]["counters"]["hook_calls_total"]
    for rank in range(2):
        _assert_params_close(one[rank]["params"], many[rank]["params"], atol=1e-6)
        assert one[rank]["rule"]["buffers"]["g_i"].keys() == many[rank]["rule"]["buffers"]["g_i"].keys()
    g_i = [one[r]["rule"]["buffers"]["g_i"]["net.0.weight"] for r in range(2)]
    assert not torch.equal(g_i[0], g_i[1])  # per-rank state really is per rank


class _RepeatedData(L.LightningDataModule):
    """32 noisy least-squares samples; rank r always gets the same 16 as one full batch (no distributed sampler).

    Each rank's gradient at the optimum x* is far from 0 (noise 2.0, 16 samples in 10 dimensions), the setting where
    compression without feedback fails.
    """

    def __init__(self, repeats: int = 200) -> None:
        super().__init__()
        self.base = SyntheticRegressionDataModule(n_samples=32, dim=10, noise_std=2.0)
        self.repeats = repeats

    def train_dataloader(self):
        rank = torch.distributed.get_rank()
        x, y = self.base.x[rank::2].repeat(self.repeats, 1), self.base.y[rank::2].repeat(self.repeats)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=False)


def test_ef21_topk_converges_to_the_optimum_in_a_trainer(tmp_path):
    data = _RepeatedData()
    opt = data.base.optimum
    kw = dict(data=data, lr=0.1, max_steps=150, use_distributed_sampler=False)
    ef21 = fit(tmp_path / "ef21", ours("ef21", TopK(0.3)), **kw)
    none = fit(tmp_path / "none", ours("none", TopK(0.3)), **kw)
    d_ef21 = (ef21[0]["params"]["linear.weight"].squeeze(0) - opt).norm() / opt.norm()
    d_none = (none[0]["params"]["linear.weight"].squeeze(0) - opt).norm() / opt.norm()
    assert d_ef21 < 1e-2  # measured 1.6e-3 (the pure-core simulation of the same problem agrees)
    assert d_none > 0.2  # Top-K without feedback stops at a biased point (measured 0.51)
    _assert_params_close(ef21[0]["params"], ef21[1]["params"], atol=0)  # replicas identical after every sync


class _CountWire(Callback):
    """Wraps the hook's communicator to count the bytes its collectives carry (at 2 ranks a ring all-reduce and an
    all-gather each send exactly the message's size per rank: an independent check of the link-byte formulas)."""

    def __init__(self):
        self.wire = 0

    def on_train_start(self, trainer, module):
        comm = trainer.strategy.hook_state.comm
        for name, share in (("all_reduce_sum_async", 1), ("all_gather_async", 1), ("all_to_all_async", 2)):
            real = getattr(comm, name)

            def counted(t, *a, real=real, share=share):  # an all-to-all keeps half of its buffer at 2 ranks
                self.wire += t.numel() * t.element_size() // share
                return real(t, *a)

            setattr(comm, name, counted)

    def on_train_end(self, trainer, module):
        trainer.callback_metrics["wire_bytes"] = torch.tensor(float(self.wire))


@pytest.mark.parametrize(("compressor", "per_step"), [(TopK(0.2), 2 * (4 + 4)), (RandK(0.3, rescale=False), 3 * 4)])
def test_bytes_on_wire_equal_payload_sizes(tmp_path, compressor, per_step):
    steps = 6
    got = fit(tmp_path, ours("ef21", compressor, log_every_n_steps=1), callbacks=[_CountWire()], max_steps=steps)
    # dense first step (10 float32), then k values (+ int32 indices); a float32 non-finite flag in every bucket
    per_rank = 10 * 4 + (steps - 1) * per_step + steps * 4
    for rank in range(2):
        assert got[rank]["counters"]["bytes_sent_total"] == per_rank
        assert got[rank]["counters"]["dense_bytes_total"] == steps * 40
        assert got[rank]["metrics"]["wire_bytes"] == per_rank  # what the collectives carried
    m = got[0]["metrics"]
    # logged at the last step (before its own hook ran? no: after) -> totals over all ranks
    assert m["convergence/compress/bytes_sent_total"] == 2 * per_rank
    assert m["convergence/compress/ratio"] == pytest.approx(steps * 40 / per_rank)
    assert m["convergence/compress/residual_norm"] > 0
    assert m["convergence/compress/nonfinite_skipped_total"] == 0
    assert all(KEY_PATTERN.match(k) for k in m if k.startswith("convergence/"))


def test_gradient_accumulation_runs_the_hook_on_sync_steps_only(tmp_path, plain_mlp):
    got = fit(tmp_path / "acc", ours("ef21", Identity()), mlp=True, max_steps=3, accumulate_grad_batches=2)
    assert got[0]["counters"]["hook_calls_total"] == 3  # one bucket, three optimizer steps, six micro-batches
    base = fit(tmp_path / "base", ddp_fork_strategy(), mlp=True, max_steps=3, accumulate_grad_batches=2)
    _assert_params_close(got[0]["params"], base[0]["params"], atol=1e-5)


@pytest.mark.parametrize(
    ("feedback", "make"),
    [("ef21_sgdm", lambda: TopK(0.2)), ("ef14", lambda: LowRank(rank=1, rounds=1)), ("ef21", lambda: LowRank(rank=2))],
    ids=["ef21_sgdm-topk", "ef14-lowrank-1round", "ef21-powersgd"],  # LowRank: compressor state resumes too
)
def test_checkpoint_resume_matches_an_uninterrupted_run(tmp_path, feedback, make):
    def strategy():
        return ours(feedback, make(), bucket_cap_mb=0.001)

    # 64 samples / 2 ranks / batch 8 = 4 steps per epoch; checkpoint at the end of epoch 1
    kw = dict(mlp=True, max_epochs=2)
    straight = fit(tmp_path / "straight", strategy(), **kw)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    fit(tmp_path / "first", strategy(), mlp=True, max_epochs=1, callbacks=[ckpt], enable_checkpointing=True)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    entry = saved["convergence/compressed_ddp"]
    assert entry["world_size"] == 2 and len(entry["ranks"]) == 2
    buf = {"ef21_sgdm": "v", "ef14": "e", "ef21": "g_i"}[feedback]
    assert not torch.equal(
        entry["ranks"][0]["feedback"]["buffers"][buf]["net.0.weight"],
        entry["ranks"][1]["feedback"]["buffers"][buf]["net.0.weight"],
    )  # per-rank state really differs, so losing rank 1's slice would show
    resumed = fit(tmp_path / "resumed", strategy(), ckpt_path=tmp_path / "ckpt" / "last.ckpt", **kw)
    for rank in range(2):
        _assert_params_close(resumed[rank]["params"], straight[rank]["params"], atol=0)
        for buf, tensors in straight[rank]["rule"]["buffers"].items():
            for name, t in tensors.items():
                assert torch.equal(resumed[rank]["rule"]["buffers"][buf][name], t), (buf, name)
        assert resumed[rank]["rule"]["steps"] == straight[rank]["rule"]["steps"]
        for name, f in straight[rank]["compressor"].get("factors", {}).items():
            assert torch.equal(resumed[rank]["compressor"]["factors"][name], f)
        # hook calls depend on DDP's first-step bucketing; each carries a 4-byte non-finite flag
        for c in (resumed[rank]["counters"], straight[rank]["counters"]):
            c["payload_bytes"] = c["bytes_sent_total"] - 4 * c["hook_calls_total"]
        for key in ("payload_bytes", "dense_bytes_total"):
            assert resumed[rank]["counters"][key] == straight[rank]["counters"][key]


class _NaNOnRank1(LinearModel):
    """Rank 1 produces a NaN loss (so NaN gradients) on step 2."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.global_rank == 1 and self.global_step == 2:
            loss = loss * float("nan")
        return loss


class _Params(Callback):
    """Records each rank's parameters after every optimizer step and saves them at the end (ddp_fork: the parent
    never sees the ranks' callbacks)."""

    def __init__(self, directory):
        self.directory, self.after = Path(directory), []

    def on_train_batch_end(self, trainer, module, *args):
        self.after.append({k: v.detach().clone() for k, v in module.named_parameters()})

    def on_train_end(self, trainer, module):
        self.directory.mkdir(parents=True, exist_ok=True)
        torch.save(self.after, self.directory / f"after{trainer.global_rank}.pt")


def _nan_run(tmp_path, policy):
    L.seed_everything(0, verbose=False)
    rec = _Params(tmp_path / "after")
    trainer = L.Trainer(
        strategy=ours("ef21", TopK(0.2), log_every_n_steps=1, on_nonfinite=policy), max_steps=5,
        callbacks=[rec, DumpOnRanks(tmp_path, _dump)], enable_checkpointing=False, **TRAINER,
    )
    trainer.fit(_NaNOnRank1(dim=10), SyntheticRegressionDataModule(n_samples=128, dim=10, batch_size=16))
    return load_rank_results(tmp_path, 2), torch.load(tmp_path / "after" / "after0.pt", weights_only=True)


def test_nonfinite_gradient_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    got, after = _nan_run(tmp_path, "skip")
    for rank in range(2):
        assert torch.isfinite(got[rank]["params"]["linear.weight"]).all()
        assert all(torch.isfinite(t).all() for b in got[rank]["rule"]["buffers"].values() for t in b.values())
        assert got[rank]["counters"]["nonfinite_skipped_total"] == 1  # once per optimizer step, on every rank
    assert got[0]["metrics"]["convergence/compress/nonfinite_skipped_total"] == 1
    assert len(after) == 5  # training went on
    for k in after[1]:  # step index 2 (the NaN step) was not applied on rank 0 either: the flag was reduced
        assert torch.equal(after[2][k], after[1][k]) and not torch.equal(after[3][k], after[2][k])
    _assert_params_close(got[0]["params"], got[1]["params"], atol=0)  # replicas still agree


def test_nonfinite_gradient_stops_training_by_default(tmp_path):
    got, after = _nan_run(tmp_path, "stop")
    assert len(after) == 3  # steps 0, 1 and the NaN step 2, which was not applied; then the trainer stopped
    for k in after[1]:
        assert torch.equal(after[2][k], after[1][k])
    assert got[0]["counters"]["nonfinite_skipped_total"] == 0
    _assert_params_close(got[0]["params"], got[1]["params"], atol=0)


def test_start_step_is_plain_ddp_before_the_switch_and_compressed_after(tmp_path, plain_mlp):
    # plain_mlp: 6 steps of plain DDP. start_step=6 over 6 steps never compresses, so it must equal DDP
    # (Top-K 10% on this MLP would change the parameters from step 1 on).
    dense = fit(tmp_path / "dense", ours("ef21", TopK(0.1), start_step=6, bucket_cap_mb=0.001), mlp=True, max_steps=6)
    for rank in range(2):
        _assert_params_close(dense[rank]["params"], plain_mlp[rank]["params"], atol=1e-6)  # float32 mean, same order
        assert dense[rank]["rule"]["steps"] == {} and dense[rank]["rule"]["buffers"]["g_i"] == {}
    # the dense steps are counted at full size: bytes sent = DDP's bytes, plus a 4-byte non-finite flag per bucket
    c = dense[0]["counters"]
    assert c["bytes_sent_total"] == c["dense_bytes_total"] + 4 * c["hook_calls_total"]

    # start_step=3: the rule starts at the switch (3 of 6 steps) from g_i = the dense gradient there
    mixed = fit(tmp_path / "mixed", ours("ef21", TopK(0.1), start_step=3), mlp=True, max_steps=6)
    assert set(mixed[0]["rule"]["steps"].values()) == {3}
    c = mixed[0]["counters"]
    assert c["dense_bytes_total"] / 2 < c["bytes_sent_total"] < c["dense_bytes_total"]  # 4 dense steps of 6
    diff = max((mixed[0]["params"][k] - plain_mlp[0]["params"][k]).abs().max().item() for k in plain_mlp[0]["params"])
    assert diff > 1e-4  # compression really started
    for k in mixed[0]["params"]:  # replicas stay equal
        assert torch.equal(mixed[0]["params"][k], mixed[1]["params"][k])


@pytest.mark.parametrize("feedback", ["ef14", "ef21"])
def test_full_rank_two_round_lowrank_equals_plain_ddp_and_counts_both_rounds(tmp_path, feedback):
    """PowerSGD's two all-reduces through the real hook: at full rank the projection is exact, so it is DDP."""
    comp = LowRank(rank=16, rounds=2, min_compression_rate=0.01)  # every MLP matrix has <= 16 rows: exact
    kw = dict(mlp=True, max_steps=6, sgd=True)
    got = fit(tmp_path / "ours", ours(feedback, comp, bucket_cap_mb=0.001), callbacks=[_CountWire()], **kw)
    plain = fit(tmp_path / "plain", ddp_fork_strategy(), **kw)
    for rank in range(2):
        _assert_params_close(got[rank]["params"], plain[rank]["params"], atol=1e-5)
        assert got[rank]["metrics"]["wire_bytes"] == got[rank]["counters"]["bytes_sent_total"]
    # bytes per compressed step: 16·(16+64) + 16·(16+16) + 10·(10+16) floats in the two rounds, plus the 3 biases
    per_step = 4 * (16 * 80 + 16 * 32 + 10 * 26 + 16 + 16 + 10)
    dense = 4 * (16 * 64 + 16 + 16 * 16 + 16 + 10 * 16 + 10)
    first = dense if feedback == "ef21" else per_step  # EF21 sends its first step dense, with no first round
    flags = 4 * got[0]["counters"]["hook_calls_total"]  # a float32 non-finite flag per bucket
    assert got[0]["counters"]["bytes_sent_total"] == first + 5 * per_step + flags


def test_8bit_powersgd_factors_keep_replicas_identical_and_count_their_bytes(tmp_path):
    comp = LowRank(rank=2, rounds=2, factor_bits=8)  # both rounds: 8-bit all-to-all + all-gather
    got = fit(tmp_path, ours("ef14", comp, bucket_cap_mb=0.001), mlp=True, max_steps=4, sgd=True,
              callbacks=[_CountWire()])
    for rank in range(2):
        assert got[rank]["counters"]["bytes_sent_total"] == got[rank]["metrics"]["wire_bytes"]
    # 2 ranks: int8 codes + a float32 scale per 256 entries, padded to 512 entries per message; far below float32
    assert got[0]["counters"]["bytes_sent_total"] < got[0]["counters"]["dense_bytes_total"] / 2
    _assert_params_close(got[0]["params"], got[1]["params"], atol=0)  # replicas bit-identical
    assert torch.equal(got[0]["compressor"]["factors"]["net.0.weight"], got[1]["compressor"]["factors"]["net.0.weight"])
