"""The streaming_diloco recipes parse with LightningCLI, build the strategy with every hyperparameter as written, and
one runs two real steps on 2 forked CPU ranks."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lightning_convergence.cli import ConvergenceCLI
from lightning_convergence.strategies.streaming_diloco import StreamingDiLoCoStrategy

CONFIGS = sorted((Path(__file__).parents[2] / "configs" / "local_sgd").glob("streaming_diloco_*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_streaming_diloco_recipe_builds_as_written(path, tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["lightning-convergence"])
    args = ["--config", str(path), "--trainer.fast_dev_run=2", "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}", "--trainer.strategy.init_args.start_method=fork",
            "--trainer.strategy.init_args.timeout=0:01:00"]
    cli = ConvergenceCLI(args=args, run=False, save_config_callback=None)
    strategy = cli.trainer.strategy
    assert isinstance(strategy, StreamingDiLoCoStrategy)
    written = yaml.safe_load(path.read_text())["trainer"]["strategy"]["init_args"]
    outer = strategy.outer
    assert (outer.num_fragments, outer.sync_every, outer.overlap_steps) == (
        written["num_fragments"], written["sync_every"], written["overlap_steps"])
    assert (outer.mixing, outer.eager, outer.quantization) == (written["mixing"], written["eager"],
                                                               written["quantization"])
    if path.stem == "streaming_diloco_fp4_char_lm":  # one recipe runs two real steps (keeps the suite fast)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
