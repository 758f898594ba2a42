"""Contract: every registered strategy name resolves, and every recipe in configs/ instantiates with LightningCLI."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from lightning.pytorch.strategies import StrategyRegistry

import lightning_convergence  # noqa: F401  (registers the names)
from lightning_convergence.cli import ConvergenceCLI

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "configs").rglob("*.yaml"))

NAMES = {
    "ddp_ef21": "CompressedDDPStrategy",
    "ddp_ef21_sgdm": "CompressedDDPStrategy",
    "ddp_econtrol": "CompressedDDPStrategy",
    "ddp_ef14": "CompressedDDPStrategy",
    "local_sgd": "LocalSGDStrategy",
    "diloco": "LocalSGDStrategy",
    "noloco": "LocalSGDStrategy",
    "co2": "LocalSGDStrategy",
    "async_fl": "AsyncFederatedStrategy",
    "demo": "OptimizerCommStrategy",
    "onebit_adam": "OptimizerCommStrategy",
    "streaming_diloco": "StreamingDiLoCoStrategy",
}


@pytest.mark.parametrize("name", sorted(NAMES))
def test_importing_the_package_registers_every_strategy_name(name):
    assert name in StrategyRegistry
    entry = StrategyRegistry[name]
    assert entry["strategy"].__name__ == NAMES[name] and entry["description"]


def test_strategy_classes_resolve_by_short_class_path():
    from lightning_convergence import strategies

    for cls_name in set(NAMES.values()):
        assert getattr(strategies, cls_name).__name__ == cls_name


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(ROOT / "configs")) for p in RECIPES])
def test_every_recipe_instantiates(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if path.name == "refined_apply.yaml":  # reads what refined_record.yaml writes (relative to the working dir)
        from lightning_convergence.optim.refinement import save_norms

        save_norms(tmp_path / "runs/schedules/refined_record/refinement_norms.json", [1.0] * 20, "l1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = ConvergenceCLI(
            args=["--config", str(path), "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}"],
            run=False, save_config_callback=None,
        )
    assert cli.trainer is not None and cli.model is not None


def test_readme_config_snippet_instantiates(tmp_path, monkeypatch):
    """The YAML shown in README.md is valid: with the example model and data substituted, it instantiates."""
    text = (ROOT / "README.md").read_text()
    snippet = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    snippet = snippet.replace("my_package.MyLightningModule", "lightning_convergence.examples.MLPClassifier")
    snippet = snippet.replace("my_package.MyDataModule", "lightning_convergence.examples.DigitsDataModule")
    cfg = tmp_path / "readme.yaml"
    cfg.write_text(snippet)
    monkeypatch.chdir(tmp_path)
    cli = ConvergenceCLI(
        args=["--config", str(cfg), "--trainer.logger=false", "--trainer.accelerator=cpu", "--trainer.devices=2"],
        run=False, save_config_callback=None,
    )
    from lightning_convergence.compress import TopK
    from lightning_convergence.strategies import CompressedDDPStrategy

    assert isinstance(cli.trainer.strategy, CompressedDDPStrategy)
    assert isinstance(cli.trainer.strategy.compressor, TopK)
