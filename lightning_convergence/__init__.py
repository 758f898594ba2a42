"""lightning-convergence: convergence-research plugins for PyTorch Lightning.

Importing the package registers every strategy name in Lightning's ``StrategyRegistry`` (so
``Trainer(strategy="<name>")`` works). The cores (``stats`` and friends) import torch only; when ``lightning`` is
unavailable the registration is skipped so the cores stay importable on their own.
"""

__version__ = "0.1.0"


def _register_strategies() -> None:
    try:
        from lightning_convergence.strategies import register_all
    except ImportError as err:  # only a missing/blocked `lightning` is tolerated, never our own import errors
        if (err.name or "").split(".")[0] in ("lightning", "lightning_fabric", "pytorch_lightning"):
            return
        raise
    register_all()


_register_strategies()

__all__ = ["__version__"]
