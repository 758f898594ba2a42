"""Every recipe under configs/variance_sampling/ parses with LightningCLI and runs two steps."""

import warnings
from pathlib import Path

import pytest

from lightning_convergence.callbacks import GradientVarianceSampling
from lightning_convergence.cli import ConvergenceCLI

RECIPES = sorted((Path(__file__).resolve().parents[2] / "configs" / "variance_sampling").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_runs(path, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = ConvergenceCLI(
            args=[
                "fit", "--config", str(path), "--trainer.fast_dev_run=2", "--trainer.logger=false",
                f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_checkpointing=false",
            ],
            run=True, save_config_callback=None,
        )
    # The example MLP applies the importance weights, so the callback must not warn that they are ignored.
    assert not [w for w in caught if "uses_sample_weights" in str(w.message)]
    cb = next(c for c in cli.trainer.callbacks if isinstance(c, GradientVarianceSampling))
    assert cb.sampler is not None and cb.sampler.state_dict()["consumed"] == 2 * 32


def test_recipes_exist():
    assert len(RECIPES) >= 2
