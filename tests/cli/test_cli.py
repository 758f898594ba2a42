"""The `lightning-convergence` command: quickstart, W&B offline fallback, config errors naming the field, DDP."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_convergence.cli import ensure_wandb_mode, main

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")


def test_quickstart_reaches_accuracy_and_writes_offline_wandb_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", QUICKSTART, "--trainer.enable_progress_bar=false"])
    out = capsys.readouterr().out
    acc = float(re.search(r"validation accuracy: ([0-9.]+)", out).group(1))
    assert acc > 0.9
    run_dir = Path(re.search(r"W&B run \(offline\) written to: (\S+)", out).group(1))
    assert run_dir.name.startswith("offline-run-") and any(run_dir.glob("*.wandb"))


def test_wandb_falls_back_to_offline_without_a_key(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    assert ensure_wandb_mode() == "offline"
    assert os.environ["WANDB_MODE"] == "offline"
    assert "logging to W&B offline" in capsys.readouterr().err
    assert ensure_wandb_mode() == "offline"  # set now: says nothing the second time
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("--trainer.max_epoks=3", "max_epoks"),  # unknown key
        ("--trainer.max_epochs=three", "max_epochs"),  # wrong type
        ("--data.init_args.batch_size=0", "batch_size"),  # our own range check
    ],
)
def test_bad_config_names_the_field(override, pattern, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises((SystemExit, ValueError)) as info:
        main(["fit", "--config", QUICKSTART, override, "--trainer.logger=false"])
    message = str(info.value) + capsys.readouterr().err
    assert pattern in message


def test_callback_argument_out_of_range_names_the_field(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(Path(QUICKSTART).read_text().replace("        log_every_n_steps: 5", "        log_every_n_steps: 0"))
    with pytest.raises(ValueError, match="`log_every_n_steps`"):
        main(["fit", "--config", str(cfg), "--trainer.logger=false"])


def test_ddp_on_two_cpu_processes(tmp_path):
    """`--trainer.devices=2 --trainer.strategy=ddp` works from the command line (popen launcher re-runs the CLI)."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable, "-m", "lightning_convergence", "fit", "--config", QUICKSTART,
        "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.max_epochs=2",
        "--trainer.enable_progress_bar=false",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "validation accuracy:" in proc.stdout
    assert proc.stdout.count("validation accuracy:") == 1  # reported once, from rank 0
