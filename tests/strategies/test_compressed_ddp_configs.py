"""Every recipe under configs/compressed_ddp/ parses with LightningCLI; one runs fast_dev_run on two forked ranks."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_convergence.cli import ConvergenceCLI
from lightning_convergence.compress import LowRank, ScaledSign, TopK
from lightning_convergence.feedback import EF14, EF21, EF21SGDM, EControl
from lightning_convergence.strategies.compressed_ddp import CompressedDDPStrategy

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "compressed_ddp"
EXPECTED = {
    "ef21_topk.yaml": (EF21, TopK),
    "ef21_sgdm_topk.yaml": (EF21SGDM, TopK),
    "econtrol_topk.yaml": (EControl, TopK),
    "ef14_sign.yaml": (EF14, ScaledSign),
    "ef14_powersgd_int8_char_lm.yaml": (EF14, LowRank),
}


def test_every_recipe_is_listed():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_parses(name, tmp_path):
    cli = ConvergenceCLI(
        args=["--config", str(CONFIGS / name), f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false"],
        run=False, save_config_callback=None,
    )
    strategy = cli.trainer.strategy
    rule_cls, comp_cls = EXPECTED[name]
    assert isinstance(strategy, CompressedDDPStrategy)
    assert type(strategy.rule) is rule_cls and type(strategy.compressor) is comp_cls


def test_powersgd_recipe_is_two_rounds_of_int8_factors(tmp_path):
    cli = ConvergenceCLI(
        args=["--config", str(CONFIGS / "ef14_powersgd_int8_char_lm.yaml"), f"--trainer.default_root_dir={tmp_path}",
              "--trainer.logger=false"],
        run=False, save_config_callback=None,
    )
    comp = cli.trainer.strategy.compressor
    assert (comp.rank, comp.rounds, comp.factor_bits, comp.transport) == (9, 2, 8, "quantized_all_reduce")


@pytest.mark.parametrize("name", ["ef21_topk.yaml", "ef14_powersgd_int8_char_lm.yaml"])
def test_recipe_runs_fast_dev_run_on_two_ranks(tmp_path, name):
    ConvergenceCLI(
        args=[
            "fit", "--config", str(CONFIGS / name), f"--trainer.default_root_dir={tmp_path}",
            "--trainer.logger=false", "--trainer.fast_dev_run=2", "--trainer.enable_progress_bar=false",
            "--trainer.strategy.init_args.start_method=fork",
        ],
        run=True, save_config_callback=None,
    )


def test_feedback_as_a_name_and_compressor_as_class_path(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "trainer:\n  accelerator: cpu\n  devices: 1\n  logger: false\n  strategy:\n"
        "    class_path: lightning_convergence.strategies.compressed_ddp.CompressedDDPStrategy\n"
        "    init_args: {feedback: ef14, compressor: {class_path: lightning_convergence.compress.QSGD, "
        "init_args: {levels: 3}}}\n"
        "model: {class_path: lightning_convergence.examples.LinearModel}\n"
        "data: {class_path: lightning_convergence.examples.SyntheticRegressionDataModule}\n"
    )
    cli = ConvergenceCLI(args=["--config", str(cfg)], run=False, save_config_callback=None)
    assert cli.trainer.strategy.rule.name == "ef14" and cli.trainer.strategy.compressor.levels == 3
