"""Contract: every core module imports with Lightning blocked, and the metric-key helper enforces the key pattern.

The cores are discovered, not listed: every module of the package except the adapters below (which import Lightning
by design) must import in a fresh interpreter where ``lightning``, ``pytorch_lightning`` and ``lightning_fabric``
are blocked, and leave no Lightning module loaded.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import lightning_convergence

# Modules that wire the cores to Lightning (or are Lightning example modules): everything else is a core.
ADAPTERS = (
    "lightning_convergence.__main__",
    "lightning_convergence.callbacks",
    "lightning_convergence.cli",
    "lightning_convergence.data.federated",  # a LightningDataModule wrapper over the federated partition core
    "lightning_convergence.examples",
    "lightning_convergence.strategies",
)


def core_modules() -> list[str]:
    names = [m.name for m in pkgutil.walk_packages(lightning_convergence.__path__, "lightning_convergence.")]
    return sorted(n for n in ["lightning_convergence", *names]
                  if not any(n == a or n.startswith(a + ".") for a in ADAPTERS))


def test_every_core_imports_with_lightning_blocked():
    cores = core_modules()
    assert len(cores) > 40 and "lightning_convergence.stats" in cores and "lightning_convergence.comm" in cores
    code = (
        "import importlib, json, sys, traceback\n"
        "for m in ('lightning', 'lightning.pytorch', 'pytorch_lightning', 'lightning_fabric'):\n"
        "    sys.modules[m] = None\n"
        "failed = {}\n"
        f"for name in {cores!r}:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception:\n"
        "        failed[name] = traceback.format_exc(limit=-2)\n"
        "loaded = sorted(k for k, v in sys.modules.items() if v is not None and k.split('.')[0] in\n"
        "                ('lightning', 'pytorch_lightning', 'lightning_fabric'))\n"
        "print(json.dumps({'failed': failed, 'loaded': loaded}))\n"
    )
    root = Path(lightning_convergence.__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["failed"] == {}, "\n".join(f"{k}:\n{v}" for k, v in result["failed"].items())
    assert result["loaded"] == []


def test_every_metric_key_follows_the_pattern():
    from lightning_convergence._metrics import metric_key

    key = metric_key("grad_stats", "grad_l2_norm/layer.0.weight")
    assert key == "convergence/grad_stats/grad_l2_norm/layer.0.weight"
    with pytest.raises(ValueError, match="`part`"):
        metric_key("gradstats", "x")
    with pytest.raises(ValueError, match="`name`"):
        metric_key("grad_stats", "Grad-Norm")
