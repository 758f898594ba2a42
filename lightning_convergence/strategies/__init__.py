"""Lightning strategies: thin adapters over the averaging, compression and federated cores.

Each strategy module exposes ``register_strategies(registry)``; :func:`register_all` calls them once, when the
package is imported. Lightning's registry raises on duplicate names, so registration checks first.
"""

from __future__ import annotations

from lightning.pytorch.strategies import StrategyRegistry

__all__ = [
    "AsyncFederatedStrategy",
    "CompressedDDPStrategy",
    "LocalSGDStrategy",
    "OptimizerCommStrategy",
    "StreamingDiLoCoStrategy",
    "register_all",
    "register_strategy",
]

# Public strategy classes, importable as ``lightning_convergence.strategies.<Class>`` (the YAML class_path form).
# Resolved lazily: the strategy modules import this package for `register_strategy`.
_LAZY = {
    "AsyncFederatedStrategy": "lightning_convergence.strategies.async_fl",
    "CompressedDDPStrategy": "lightning_convergence.strategies.compressed_ddp",
    "LocalSGDStrategy": "lightning_convergence.strategies.local_sgd",
    "OptimizerCommStrategy": "lightning_convergence.strategies.optimizer_comm",
    "StreamingDiLoCoStrategy": "lightning_convergence.strategies.streaming_diloco",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

# Strategy modules that register names, in import order. Each later issue appends its module here.
_STRATEGY_MODULES: tuple[str, ...] = (
    "lightning_convergence.strategies.compressed_ddp",
    "lightning_convergence.strategies.local_sgd",
    "lightning_convergence.strategies.async_fl",
    "lightning_convergence.strategies.optimizer_comm",
    "lightning_convergence.strategies.streaming_diloco",
)


def register_strategy(name: str, strategy_cls: type, description: str, **init_kwargs: object) -> None:
    """Register ``name`` unless it already exists (importing twice, or another package owns it)."""
    if name in StrategyRegistry:
        return
    StrategyRegistry.register(name, strategy_cls, description=description, **init_kwargs)


def register_all() -> None:
    """Import every strategy module and let it register its names."""
    import importlib

    for module in _STRATEGY_MODULES:
        importlib.import_module(module).register_strategies()
