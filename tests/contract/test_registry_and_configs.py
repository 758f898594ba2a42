"""Contract: the part registry covers every public part, every registered strategy name resolves, and every recipe in
``configs/`` runs ``fast_dev_run`` through the CLI at the world size it is written for."""

from __future__ import annotations

import inspect
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from lightning.pytorch.strategies import StrategyRegistry

import lightning_convergence  # noqa: F401  (registers the names)
from lightning_convergence import strategies
from lightning_convergence.cli import ConvergenceCLI
from tests.contract.parts import PARTS, discovered_parts, part_class
from tests.helpers.dist import run_processes
from tests.helpers.resume import external_launch_env

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "configs").rglob("*.yaml"))

pytestmark = [pytest.mark.timeout(120), pytest.mark.filterwarnings("ignore::UserWarning")]


def test_registry_covers_every_public_part():
    assert {p.base for p in PARTS.values()} == discovered_parts()


@pytest.mark.parametrize("name", sorted(n for n, p in PARTS.items() if p.base in StrategyRegistry))
def test_registered_strategy_resolves_by_name_and_short_class_path(name):
    entry = StrategyRegistry[name]
    cls = entry["strategy"]
    assert entry["description"]
    assert getattr(strategies, cls.__name__) is cls  # the YAML form lightning_convergence.strategies.<Class>
    assert set(entry["init_params"]) <= set(inspect.signature(cls).parameters)  # every registered setting is real


@pytest.mark.parametrize("name", sorted(PARTS))
def test_part_cores_are_what_its_adapter_imports(name):
    """The registry's core list is the adapter's real dependency on the cores (which test_imports checks are
    Lightning-free): every listed core is imported by the adapter's module."""
    part = PARTS[name]
    source = inspect.getsource(inspect.getmodule(part_class(part)))
    for core in part.cores:
        pattern = rf"lightning_convergence(\.{core}\b| import ([\w, ]*\b)?{core}\b)"
        assert re.search(pattern, source), f"{name}: does not import lightning_convergence.{core}"


# GPU-sized recipes shrunk for 2 CPU cores (the strategy, optimizer and schedule run as written): one narrow layer
# of the char transformer, in float32 (bf16 autocast on CPU is slow and adds nothing to what this test checks).
_SMALL_TRANSFORMER = ["--model.init_args.d_model=32", "--model.init_args.n_layers=1", "--model.init_args.n_heads=2",
                      "--trainer.precision=32-true"]
RECIPE_OVERRIDES = {
    "adamw_compression/demo_transformer.yaml": _SMALL_TRANSFORMER,
    "adamw_compression/onebit_adam_transformer.yaml": _SMALL_TRANSFORMER,
}


def _recipe_world_size(path: Path) -> int:
    devices = (yaml.safe_load(path.read_text()).get("trainer") or {}).get("devices", 1)
    return devices if isinstance(devices, int) else 1  # "auto": one CPU device here


# What a recipe of one part must show after its two micro-batches, beyond "it ran": ``check(cli, stem, warnings)``
# runs on every rank with the messages of the warnings the run raised.
def _check_adaptive_batch(cli: Any, stem: str, caught: list[str]) -> None:
    from lightning_convergence.callbacks import AdaptiveBatchSize

    cb = next(c for c in cli.trainer.callbacks if isinstance(c, AdaptiveBatchSize))
    assert cb.history, "the batch-size test ran at least once"
    assert cb.global_batch_size >= 16


def _check_early_stopping(cli: Any, stem: str, caught: list[str]) -> None:
    from lightning.pytorch.callbacks import EarlyStopping

    from lightning_convergence.callbacks import ConvergenceEarlyStopping, GradientEarlyStopping

    expected = {"grades_classifier": GradientEarlyStopping, "grades_char_lm": GradientEarlyStopping,
                "convergence_stop_classifier": ConvergenceEarlyStopping, "patience_baseline_classifier": EarlyStopping}
    cb = next(c for c in cli.trainer.callbacks if isinstance(c, expected[stem]))
    if isinstance(cb, GradientEarlyStopping):
        assert cb.core is not None and len(cb.core.names) >= 3
        if stem == "grades_char_lm":  # the name patterns select the 4 attention/MLP matrices of the block
            assert len(cb.core.names) == 4, cb.core.names


def _check_variance_sampling(cli: Any, stem: str, caught: list[str]) -> None:
    from lightning_convergence.callbacks import GradientVarianceSampling

    # The example MLP applies the importance weights, so the callback must not warn that they are ignored.
    assert not [m for m in caught if "uses_sample_weights" in m]
    cb = next(c for c in cli.trainer.callbacks if isinstance(c, GradientVarianceSampling))
    assert cb.sampler is not None and cb.sampler.state_dict()["consumed"] == 2 * 32  # 2 batches of 32


def _check_async_fl(cli: Any, stem: str, caught: list[str]) -> None:
    from lightning_convergence.federated import ServerRule

    strategy = cli.trainer.strategy
    assert isinstance(strategy.rule, ServerRule) and cli.datamodule.num_clients == strategy.num_clients
    if stem in ("fedbuff_digits", "fedavg_digits"):  # two server updates applied (async buffer / synchronous round)
        assert strategy.rule.version >= 2, strategy.rule.version


RECIPE_CHECKS: dict[str, Callable[[Any, str, list[str]], None]] = {
    "adaptive_batch": _check_adaptive_batch, "early_stopping": _check_early_stopping,
    "variance_sampling": _check_variance_sampling, "async_fl": _check_async_fl,
}


def _run_recipe(rank: int, world_size: int, path: str, root: str, own_group: bool) -> int:
    if not own_group:
        external_launch_env(rank, world_size)  # the forked ranks already share a gloo group; Lightning reuses it
    # fast_dev_run replaces the recipe's logger by a no-op one and suppresses checkpoints.
    args = ["fit", "--config", path, "--trainer.fast_dev_run=2", "--trainer.accelerator=cpu",
            f"--trainer.devices={world_size}", f"--trainer.default_root_dir={root}",
            "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false"]
    if own_group:  # the federated server forks its clients itself; no artificial client delay, fast failure
        args += ["--trainer.strategy.init_args.step_delay_s=0.0", "--trainer.strategy.init_args.shutdown_timeout_s=5.0"]
    args += RECIPE_OVERRIDES.get(Path(path).relative_to(ROOT / "configs").as_posix(), [])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = ConvergenceCLI(args=args, run=True, save_config_callback=None)
    check = RECIPE_CHECKS.get(Path(path).parent.name)
    if check is not None:
        check(cli, Path(path).stem, [str(w.message) for w in caught])
    return cli.trainer.global_step


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(ROOT / "configs")) for p in RECIPES])
def test_every_recipe_runs_fast_dev_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if path.name == "refined_apply.yaml":  # reads what refined_record.yaml writes (relative to the working dir)
        from lightning_convergence.optim.refinement import save_norms

        save_norms(tmp_path / "runs/schedules/refined_record/refinement_norms.json", [1.0] * 20, "l1")
    monkeypatch.setattr("sys.argv", ["lightning-convergence"])  # LightningCLI warns about pytest's own argv
    own_group = "AsyncFederatedStrategy" in path.read_text()
    steps = run_processes(_run_recipe, _recipe_world_size(path), str(path), str(tmp_path), own_group,
                          init_group=not own_group)
    assert all(s >= 1 for s in steps), steps  # at least one optimizer step on every rank (2 micro-batches)


def test_readme_config_snippet_instantiates(tmp_path, monkeypatch):
    """The YAML shown in README.md is valid: with the example model and data substituted, it instantiates."""
    text = (ROOT / "README.md").read_text()
    snippet = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    snippet = snippet.replace("my_package.MyLightningModule", "lightning_convergence.examples.MLPClassifier")
    snippet = snippet.replace("my_package.MyDataModule", "lightning_convergence.examples.DigitsDataModule")
    cfg = tmp_path / "readme.yaml"
    cfg.write_text(snippet)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["lightning-convergence"])
    cli = ConvergenceCLI(
        args=["--config", str(cfg), "--trainer.logger=false", "--trainer.accelerator=cpu", "--trainer.devices=2"],
        run=False, save_config_callback=None,
    )
    from lightning_convergence.compress import TopK
    from lightning_convergence.strategies import CompressedDDPStrategy

    assert isinstance(cli.trainer.strategy, CompressedDDPStrategy)
    assert isinstance(cli.trainer.strategy.compressor, TopK)
