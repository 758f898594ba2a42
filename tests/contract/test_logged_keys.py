"""Contract: on a real run (2 forked ranks, accumulation 2, 4 optimizer steps, ``log_every_n_steps=1``) every part
logs the ``convergence/...`` keys the registry lists for it, every value is finite, every key it writes follows
``convergence/<part>/<metric>`` and names a metric its class docstring documents under ``Logs:``."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest

from lightning_convergence._metrics import KEY_PATTERN
from tests.contract.parts import PARTS, part_class
from tests.helpers.dist import run_processes
from tests.helpers.loggers import MemoryLogger
from tests.helpers.resume import external_launch_env, fit

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


def _logged(rank: int, world_size: int, name: str, root: str) -> dict[str, list[float]]:
    external_launch_env(rank, world_size)
    warnings.simplefilter("ignore")
    logger = MemoryLogger()  # writes on global rank 0 only, like every logger
    fit(PARTS[name].case, Path(root), world_size, 2, logger=logger)
    out: dict[str, list[float]] = {}
    for _, metrics in logger.history:
        for key, value in metrics.items():
            if key.startswith("convergence/"):
                out.setdefault(key, []).append(value)
    return out


def _documented(key: str, doc: str) -> bool:
    """``convergence/<part>/<metric>[/<item>]`` is documented when the docstring names the key or its metric."""
    metric = key.split("/")[2]
    return key in doc or f"{metric}``" in doc or f"/{metric}" in doc


@pytest.mark.parametrize("name", sorted(n for n, p in PARTS.items() if p.resume == "anywhere"))
def test_part_logs_its_documented_keys_and_only_finite_values(name, tmp_path):
    part = PARTS[name]
    logged = run_processes(_logged, 2, name, str(tmp_path))[0]
    missing = set(part.keys) - set(logged)
    assert not missing, f"{name}: never logged {sorted(missing)}"
    bad_pattern = [k for k in logged if not KEY_PATTERN.match(k)]
    assert not bad_pattern, f"{name}: keys outside convergence/<part>/<metric>: {bad_pattern}"
    doc = part_class(part).__doc__ or ""
    undocumented = [k for k in logged if not _documented(k, doc)]
    assert not undocumented, f"{name}: logs keys its docstring's Logs: section does not name: {undocumented}"
    nonfinite = {k: v for k, v in logged.items() if not all(math.isfinite(x) for x in v)}
    assert not nonfinite, f"{name}: non-finite values logged: {nonfinite}"
