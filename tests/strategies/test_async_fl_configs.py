"""Every recipe under configs/async_fl parses with LightningCLI; the FedBuff (asynchronous) and FedAvg (rounds) recipes
also run two server updates with their 8 forked clients (the others share the same machinery; kept short for CI)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_convergence.cli import ConvergenceCLI
from lightning_convergence.data import FederatedDataModule
from lightning_convergence.federated import ServerRule
from lightning_convergence.strategies.async_fl import AsyncFederatedStrategy

CONFIGS = sorted((Path(__file__).parents[2] / "configs" / "async_fl").glob("*.yaml"))

pytestmark = [pytest.mark.timeout(60), pytest.mark.filterwarnings("ignore:.*self.log.*")]


def test_async_fl_configs_exist():
    assert {p.stem for p in CONFIGS} >= {"fedbuff_digits", "fedasync_digits", "fedfix_digits", "fedavg_digits",
                                         "fedau_digits"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_async_fl_config_parses_and_runs(path, tmp_path):
    args = ["--config", str(path), "--trainer.fast_dev_run=2", "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}", "--trainer.strategy.init_args.step_delay_s=0.0",
            "--trainer.strategy.init_args.shutdown_timeout_s=5.0"]
    cli = ConvergenceCLI(args=args, run=False, save_config_callback=None)
    strategy = cli.trainer.strategy
    assert isinstance(strategy, AsyncFederatedStrategy) and isinstance(strategy.rule, ServerRule)
    assert isinstance(cli.datamodule, FederatedDataModule) and cli.datamodule.num_clients == strategy.num_clients
    if path.stem in ("fedbuff_digits", "fedavg_digits"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        assert strategy.rule.version >= 2
