"""Every recipe under configs/early_stopping/ parses with LightningCLI and runs two steps with its callback."""

from __future__ import annotations

from pathlib import Path

import pytest
from lightning.pytorch.callbacks import EarlyStopping

from lightning_convergence.callbacks import ConvergenceEarlyStopping, GradientEarlyStopping
from lightning_convergence.cli import ConvergenceCLI

RECIPES = sorted((Path(__file__).resolve().parents[2] / "configs" / "early_stopping").glob("*.yaml"))
EXPECTED = {
    "grades_classifier": GradientEarlyStopping,
    "grades_char_lm": GradientEarlyStopping,
    "convergence_stop_classifier": ConvergenceEarlyStopping,
    "patience_baseline_classifier": EarlyStopping,
}


def test_recipes_exist() -> None:
    assert {p.stem for p in RECIPES} == set(EXPECTED)


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_runs(path: Path, tmp_path: Path) -> None:
    cli = ConvergenceCLI(
        args=[
            "fit", "--config", str(path), "--trainer.fast_dev_run=2", "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_checkpointing=false",
        ],
        run=True, save_config_callback=None,
    )
    cb = next(c for c in cli.trainer.callbacks if isinstance(c, EXPECTED[path.stem]))
    assert cli.trainer.global_step >= 1  # 2 micro-batches: 1 step with accumulate_grad_batches=2
    if isinstance(cb, GradientEarlyStopping):
        assert cb.core is not None and len(cb.core.names) >= 3
        if path.stem == "grades_char_lm":  # the name patterns select the 4 attention/MLP matrices of the block
            assert len(cb.core.names) == 4
