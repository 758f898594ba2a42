"""An in-memory Lightning logger, so tests can check what was logged (wandb has no offline reader)."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.loggers.logger import Logger
from lightning.pytorch.utilities import rank_zero_only


class MemoryLogger(Logger):
    """Keeps every ``log_metrics`` call as ``(step, metrics)`` in :attr:`history`."""

    def __init__(self) -> None:
        super().__init__()
        self.history: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.history.append((step, dict(metrics)))

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def values(self, key: str) -> list[float]:
        """Every logged value of ``key``, in order."""
        return [m[key] for _, m in self.history if key in m]
