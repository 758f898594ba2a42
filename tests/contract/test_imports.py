"""Contract: the cores import without Lightning; importing the package registers every strategy name."""

from __future__ import annotations

import subprocess
import sys

import pytest

CORES = [
    "lightning_convergence.stats",
    "lightning_convergence._rank_state",
    "lightning_convergence.compress",
    "lightning_convergence.feedback",
    "lightning_convergence.averaging",
    "lightning_convergence.federated",
    "lightning_convergence.sampling",
    "lightning_convergence.stopping",
    "lightning_convergence.optim",
    "lightning_convergence._checks",
    "lightning_convergence._nonfinite",
    "lightning_convergence.data.loader",
    "lightning_convergence.data.resizable",
]


@pytest.mark.parametrize("module", CORES)
def test_core_imports_with_lightning_blocked(module):
    code = (
        "import sys\n"
        "for m in ('lightning', 'lightning.pytorch', 'pytorch_lightning', 'lightning_fabric'):\n"
        "    sys.modules[m] = None\n"
        f"import {module}\n"
        "assert not any(k.startswith('lightning.') for k in sys.modules if sys.modules[k] is not None)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_metric_key_follows_the_pattern():
    from lightning_convergence._metrics import metric_key

    key = metric_key("grad_stats", "grad_l2_norm/layer.0.weight")
    assert key == "convergence/grad_stats/grad_l2_norm/layer.0.weight"
    with pytest.raises(ValueError, match="`part`"):
        metric_key("gradstats", "x")
    with pytest.raises(ValueError, match="`name`"):
        metric_key("grad_stats", "Grad-Norm")
