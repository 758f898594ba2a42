"""Every recipe in configs/schedules and configs/optim parses with LightningCLI; the two-run recipe pair runs."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
import yaml

from lightning_convergence.cli import ConvergenceCLI
from lightning_convergence.optim import load_norms, save_norms

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "configs" / "schedules").glob("*.yaml")) + sorted((ROOT / "configs" / "optim").glob("*.yaml"))


def _localise(path: Path, tmp_path: Path, norms: bool = True) -> Path:
    """The recipe with every ``runs/`` path moved under ``tmp_path`` (and, optionally, a norms file to apply)."""
    if norms:
        save_norms(tmp_path / "runs/schedules/refined_record/refinement_norms.json", [3.0, 2.0, 1.5, 1.4, 1.5], "l1")
    out = tmp_path / path.name
    out.write_text(path.read_text().replace("runs/", f"{tmp_path}/runs/"))
    return out


def _build(spec: dict, *args):
    module, _, name = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(*args, **spec.get("init_args", {}))


@pytest.fixture(scope="module")
def parser(tmp_path_factory):
    """One LightningCLI parser for all recipes (building it costs ~3 s; each parse then ~0.3 s)."""
    pytest.importorskip("schedulefree")  # configs/optim/adamw_schedulefree.yaml needs the optional extra `optim`
    tmp = tmp_path_factory.mktemp("parser")
    cli = ConvergenceCLI(args=["--config", str(_localise(RECIPES[0], tmp))], run=False, save_config_callback=None)
    return cli.parser


def test_recipes_found():
    names = {p.stem for p in RECIPES}
    assert {"cosine", "linear", "rex", "uba", "wsd", "refined_record", "refined_apply", "refined_online",
            "adagrad_norm", "adamw_schedulefree"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_recipes_parse_and_instantiate(recipe, parser, tmp_path):
    local = _localise(recipe, tmp_path)
    cfg = parser.parse_args(["--config", str(local)])
    init = parser.instantiate_classes(cfg)
    model = init["model"]
    raw = yaml.safe_load(local.read_text())
    opt = _build(raw["optimizer"], model.parameters())
    assert isinstance(opt, torch.optim.Optimizer)
    if "lr_scheduler" in raw:
        sched = _build(raw["lr_scheduler"], opt)
        # The budget written in the schedule matches the trainer's, and the schedule declares per-step stepping.
        assert sched.total_steps == raw["trainer"]["max_steps"]
        assert getattr(sched, "interval", "step") == "step"  # ours declare it; torch's OneCycleLR is per-step too


def test_recipes_cli_schedules_step_every_optimizer_step():
    from lightning_convergence.optim import LinearDecay

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    out = ConvergenceCLI.configure_optimizers(None, opt, LinearDecay(opt, total_steps=10))
    assert isinstance(out, dict) and out["lr_scheduler"]["interval"] == "step"


def test_recipes_refined_record_runs_and_writes_norms(tmp_path):
    """The recording recipe end to end (tiny): AdamW -> l1 norms, one per step, written where refined_apply reads."""
    record = _localise(ROOT / "configs/schedules/refined_record.yaml", tmp_path, norms=False)
    cli = ConvergenceCLI(
        args=["fit", "--config", str(record), "--trainer.max_steps=4", "--lr_scheduler.init_args.total_steps=4",
              "--lr_scheduler.init_args.warmup_steps=1", "--data.init_args.max_chars=4000",
              "--model.init_args.d_model=16", "--model.init_args.n_layers=1", "--trainer.limit_val_batches=0",
              "--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
              "--trainer.enable_model_summary=false"],
        run=True, save_config_callback=None,
    )
    assert cli.trainer.global_step == 4
    record_norms = load_norms(tmp_path / "runs/schedules/refined_record/refinement_norms.json")
    assert record_norms["norm_type"] == "l1" and len(record_norms["norms"]) == 4
    apply = yaml.safe_load(_localise(ROOT / "configs/schedules/refined_apply.yaml", tmp_path, norms=False).read_text())
    assert apply["lr_scheduler"]["init_args"]["norms"] == str(tmp_path / "runs/schedules/refined_record/"
                                                              "refinement_norms.json")
