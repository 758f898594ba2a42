"""Every recipe under configs/local_sgd parses with LightningCLI and builds its strategy; two run 2 steps on 2 forked
CPU ranks."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_convergence.averaging import OuterStep, SyncSchedule
from lightning_convergence.cli import ConvergenceCLI
from lightning_convergence.strategies.local_sgd import LocalSGDStrategy

RUN = {"diloco_digits", "diloco_topk_char_lm"}
CONFIGS = sorted((Path(__file__).parents[2] / "configs" / "local_sgd").glob("*.yaml"))


def test_local_sgd_configs_exist():
    assert len(CONFIGS) >= 6


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_local_sgd_config_parses_and_runs(path, tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["lightning-convergence"])
    args = [
        "--config", str(path), "--trainer.fast_dev_run=2", "--trainer.logger=false",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.strategy.init_args.start_method=fork",
        "--trainer.strategy.init_args.timeout=0:01:00",
    ]
    cli = ConvergenceCLI(args=args, run=False, save_config_callback=None)
    strategy = cli.trainer.strategy
    assert isinstance(strategy, LocalSGDStrategy)
    assert isinstance(strategy.outer, OuterStep) and isinstance(strategy.schedule, SyncSchedule)
    if path.stem in RUN:  # one recipe per model runs two real steps; the rest parse and build (keeps the suite fast)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
