"""The compressed-DDP recipes: each builds the rule and compressor it names, and two recipes, run for two steps on two
forked ranks on a small known MLP, log exactly the link bytes and ratio computed by hand from the link formulas."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_convergence.cli import ConvergenceCLI
from lightning_convergence.compress import LowRank, ScaledSign, TopK
from lightning_convergence.examples import MLPClassifier
from lightning_convergence.feedback import EF14, EF21, EF21SGDM, EControl
from lightning_convergence.strategies.compressed_ddp import CompressedDDPStrategy
from tests.helpers.dist import DumpOnRanks, fork_strategy_kwargs, load_rank_results

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "compressed_ddp"
EXPECTED = {
    "ef21_topk.yaml": (EF21, TopK),
    "ef21_sgdm_topk.yaml": (EF21SGDM, TopK),
    "econtrol_topk.yaml": (EControl, TopK),
    "ef14_sign.yaml": (EF14, ScaledSign),
    "ef14_powersgd_int8_char_lm.yaml": (EF14, LowRank),
}

# The known model: MLPClassifier(num_features=64, hidden=[64], num_classes=10) has a 64x64 weight, a 64 bias, a 10x64
# weight and a 10 bias: P = 4096 + 64 + 640 + 10 = 4810 float32 entries. Plain DDP's ring all-reduce at W = 2 sends
# 2(W-1)/W * 4P = 19240 bytes per rank and step, 38480 over the two steps.
DDP_PER_RANK = 2 * 19240

# ef21_topk.yaml (EF21 + TopK(0.1)). Step 1: EF21's dense first step, all 4810 floats plus the 4-byte non-finite flag
# in one ring all-reduce: 2(W-1)/W * (19240 + 4) = 19244. Step 2: Top-K keeps ceil(0.1 d) entries per tensor,
# 410 + 7 + 64 + 1 = 482, each a float32 value and an int32 index, plus the flag, by all-gather: (W-1) * (482*8 + 4).
TOPK_PER_RANK = 19244 + (482 * 8 + 4)

# ef14_powersgd_int8_char_lm.yaml (EF14 + LowRank(rank=7, rounds=2, factor_bits=8)); only the 64x64 weight is
# factorised (4096 > 2 * 7 * (64 + 64); the 10x64 weight: 640 < 2 * 7 * 74). Each round is an 8-bit all-to-all plus
# all-gather of the entries padded to W*256 = 512, int8 codes plus a float32 scale per 256 entries, of which each
# sends (W-1)/W: round 1, P = 64*7 = 448 entries -> 512 -> 512 + 8 bytes -> 260 + 260; round 2, Q = 448 entries,
# the dense 64 + 640 + 10 = 714 and the flag's block of 256 = 1418 -> 1536 -> 1536 + 24 bytes -> 780 + 780.
POWERSGD_PER_RANK = 2 * (520 + 1560)


def _parse(name: str, tmp_path: Path, *extra: str) -> ConvergenceCLI:
    return ConvergenceCLI(
        args=["--config", str(CONFIGS / name), f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
              *extra],
        run=False, save_config_callback=None,
    )


def test_every_recipe_is_listed():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_builds_the_rule_and_compressor_it_names(name, tmp_path):
    strategy = _parse(name, tmp_path).trainer.strategy
    rule_cls, comp_cls = EXPECTED[name]
    assert isinstance(strategy, CompressedDDPStrategy)
    assert type(strategy.rule) is rule_cls and type(strategy.compressor) is comp_cls


class _Data(L.LightningDataModule):
    def train_dataloader(self):
        gen = torch.Generator().manual_seed(0)
        x, y = torch.randn(32, 64, generator=gen), torch.randint(0, 10, (32,), generator=gen)
        ds = torch.utils.data.TensorDataset(x, y)
        return torch.utils.data.DataLoader(ds, batch_size=8, shuffle=False)


def _logged(trainer, module):
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("convergence/compress/")}


@pytest.mark.parametrize(("name", "per_rank"), [("ef21_topk.yaml", TOPK_PER_RANK),
                                                ("ef14_powersgd_int8_char_lm.yaml", POWERSGD_PER_RANK)])
def test_recipe_logs_the_hand_computed_link_bytes_and_ratio(name, per_rank, tmp_path):
    recipe = _parse(name, tmp_path).trainer.strategy
    # the recipe's rule, compressor and warm-up on forked ranks (the recipe starts its ranks with popen), logging
    # every step
    strategy = CompressedDDPStrategy(feedback=recipe.rule, compressor=recipe.compressor, start_step=recipe.start_step,
                                     log_every_n_steps=1, **fork_strategy_kwargs())
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_steps=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[DumpOnRanks(tmp_path / "out", _logged)],
    )
    trainer.fit(MLPClassifier(num_features=64, hidden=[64], num_classes=10), _Data())
    logged = load_rank_results(tmp_path / "out", 2)[0]
    assert logged["convergence/compress/bytes_sent_total"] == 2 * per_rank  # both ranks, exact
    # float64 sums of integers, then one division: equal to the hand ratio up to float32 logging
    assert logged["convergence/compress/ratio"] == pytest.approx(DDP_PER_RANK / per_rank, rel=1e-6)
