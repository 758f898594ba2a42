"""GradientVarianceSampling on two real gloo ranks (ddp_fork): Lightning keeps our sampler, the ranks draw disjoint
shares of every window whose union is the allocation, and both ranks hold the same allocation."""

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer, seed_everything
from torch.utils.data import DataLoader, TensorDataset

from lightning_convergence.callbacks import GradientVarianceSampling
from lightning_convergence.sampling import GroupBudgetSampler
from tests.helpers.dist import DumpOnRanks, ddp_fork_strategy, load_rank_results

N, BATCH, EVERY = 96, 4, 2


class IndexedLinear(LightningModule):
    """Logistic regression whose first feature is the example's index, so batches reveal what was drawn."""

    uses_sample_weights = True

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)
        self.drawn: list[list[int]] = []

    def forward(self, x):
        return self.lin(x[:, 1:])

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.drawn.append(x[:, 0].long().tolist())
        return (F.cross_entropy(self(x), y, reduction="none") * self.sample_weights).mean()

    def train_dataloader(self):
        gen = torch.Generator().manual_seed(0)
        y = torch.tensor([0] * 60 + [1] * 24 + [2] * 12)
        x = torch.cat([torch.arange(N).float()[:, None], torch.randn(N, 3, generator=gen) + y[:, None]], dim=1)
        return DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _dump(trainer, module):
    cb = trainer.callbacks[0]
    return {
        "drawn": module.drawn,
        "sampler_is_ours": isinstance(trainer.train_dataloader.sampler, GroupBudgetSampler),
        "state": cb.sampler.state_dict(),
        "rank": cb.sampler.rank,
    }


def test_two_ranks_draw_disjoint_shares(tmp_path):
    seed_everything(0)
    cb = GradientVarianceSampling(policy="gvm", check_every_n_steps=EVERY, probe_per_group=4, seed=3)
    trainer = Trainer(
        strategy=ddp_fork_strategy(), devices=2, accelerator="cpu", max_steps=8, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[cb, DumpOnRanks(tmp_path, _dump)],
    )
    trainer.fit(IndexedLinear())
    r0, r1 = load_rank_results(tmp_path, 2)
    assert r0["sampler_is_ours"] and r1["sampler_is_ours"] and (r0["rank"], r1["rank"]) == (0, 1)
    torch.testing.assert_close(r0["state"]["window_counts"], r1["state"]["window_counts"], rtol=0, atol=0)
    groups = torch.tensor([0] * 60 + [1] * 24 + [2] * 12)
    per_window = EVERY  # batches per rank per window
    for w in range(8 // per_window):
        a = sum(r0["drawn"][w * per_window : (w + 1) * per_window], [])
        b = sum(r1["drawn"][w * per_window : (w + 1) * per_window], [])
        assert set(a).isdisjoint(b)
        union = torch.tensor(a + b)
        assert torch.bincount(groups[union], minlength=3).tolist() == r0["state"]["window_counts"][w].tolist()


def _dump_resume(trainer, module):
    cb = trainer.callbacks[0]
    return {
        "params": {k: v.detach().clone() for k, v in module.named_parameters()},
        "drawn": module.drawn,
        "sampler": cb.sampler.state_dict(),
        "stats": cb.group_stats.state_dict(),
    }


def test_resume_is_identical_on_two_ranks(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(out, max_steps, ckpt_path=None, save=False):
        seed_everything(0)
        cb = GradientVarianceSampling(policy="neyman", check_every_n_steps=EVERY, probe_per_group=4, seed=3)
        extra = [ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)] if save else []
        trainer = Trainer(
            strategy=ddp_fork_strategy(), devices=2, accelerator="cpu", max_steps=max_steps, logger=False,
            enable_checkpointing=save, enable_progress_bar=False, enable_model_summary=False,
            callbacks=[cb, DumpOnRanks(tmp_path / out, _dump_resume), *extra],
        )
        trainer.fit(IndexedLinear(), ckpt_path=ckpt_path)
        return load_rank_results(tmp_path / out, 2)

    straight = run("straight", 8)
    run("first", 3, save=True)
    resumed = run("resumed", 8, ckpt_path=str(next((tmp_path / "ckpt").glob("*step=3.ckpt"))))
    for rank in range(2):
        a, b = straight[rank], resumed[rank]
        for k, v in a["params"].items():
            assert torch.equal(v, b["params"][k]), (rank, k)
        assert a["drawn"][3:] == b["drawn"]  # the same examples, in the same order, after the checkpoint
        assert a["sampler"]["consumed"] == b["sampler"]["consumed"] == 8 * BATCH
        torch.testing.assert_close(a["sampler"]["window_counts"], b["sampler"]["window_counts"], rtol=0, atol=0)
        for k, v in a["stats"]["avg"].items():
            torch.testing.assert_close(v, b["stats"]["avg"][k], rtol=0, atol=0)
