"""Every recipe under configs/adaptive_batch/ parses with LightningCLI and runs two micro-batches."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_convergence.callbacks import AdaptiveBatchSize
from lightning_convergence.cli import ConvergenceCLI

RECIPES = sorted((Path(__file__).resolve().parents[2] / "configs" / "adaptive_batch").glob("*.yaml"))


def test_recipes_exist():
    assert {p.stem for p in RECIPES} >= {"norm_digits", "inner_product_lm", "augmented_digits"}


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_runs(path, tmp_path):
    cli = ConvergenceCLI(
        args=[
            "fit", "--config", str(path), "--trainer.fast_dev_run=2", "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_checkpointing=false",
        ],
        run=True, save_config_callback=None,
    )
    cb = next(c for c in cli.trainer.callbacks if isinstance(c, AdaptiveBatchSize))
    assert cb.history, "the test ran at least once"
    assert cb.global_batch_size >= 16
