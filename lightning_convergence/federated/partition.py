"""Client heterogeneity for federated runs: data partitions, speed factors and participation patterns (torch only).

Every draw comes from a ``torch.Generator`` seeded by the caller (Dirichlet draws run inside a forked global RNG, so
the training's own randomness is untouched), so a partition is a pure function of its arguments.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["PARTITIONS", "partition_indices", "speed_factors", "Participation"]

PARTITIONS = ("iid", "dirichlet", "quantity")


def _dirichlet(alpha: float, k: int, g: torch.Generator) -> Tensor:
    seed = int(torch.randint(0, 2**62, (1,), generator=g))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.distributions.Dirichlet(torch.full((k,), float(alpha))).sample()


def _split_by_proportions(idx: Tensor, props: Tensor) -> list[Tensor]:
    cuts = (torch.cumsum(props, 0) * len(idx)).round().long().clamp(max=len(idx))
    cuts[-1] = len(idx)
    starts = torch.cat([torch.zeros(1, dtype=torch.long), cuts[:-1]])
    return [idx[s:e] for s, e in zip(starts.tolist(), cuts.tolist())]


def partition_indices(
    num_items: int, num_clients: int, scheme: str = "iid", labels: Sequence[int] | Tensor | None = None,
    alpha: float = 0.5, seed: int = 0, min_size: int = 1, max_tries: int = 100,
) -> list[list[int]]:
    """Split ``range(num_items)`` across ``num_clients`` clients.

    Schemes: ``"iid"`` (a seeded permutation cut into near-equal parts); ``"dirichlet"`` (label skew: for each
    class, the share of each client ~ Dir(α), as in Hsu, Qi, Brown 2019, arXiv:1909.06335; needs ``labels``);
    ``"quantity"`` (quantity skew: client sizes ∝ Dir(α), labels ignored). Small α means strong skew (0.1 is severe,
    100 is nearly IID). Dirichlet schemes are redrawn (up to ``max_tries``) until every client has ``min_size``
    items.

    Raises:
        ValueError: for a bad ``scheme``, ``num_clients``, ``alpha``, missing ``labels``, or no valid draw.
    """
    if scheme not in PARTITIONS:
        raise ValueError(f"partition_indices: `scheme` must be one of {PARTITIONS}, got {scheme!r}.")
    if not (isinstance(num_clients, int) and 1 <= num_clients):
        raise ValueError(f"partition_indices: `num_clients` must be an int >= 1, got {num_clients!r}.")
    if num_items < num_clients * min_size:
        raise ValueError(
            f"partition_indices: `num_items` ({num_items}) must be >= num_clients·min_size ({num_clients * min_size})."
        )
    if not (isinstance(alpha, (int, float)) and alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"partition_indices: `alpha` must be a finite number > 0, got {alpha!r}.")
    g = torch.Generator().manual_seed(int(seed))
    if scheme == "iid":
        perm = torch.randperm(num_items, generator=g)
        return [sorted(p.tolist()) for p in torch.tensor_split(perm, num_clients)]
    if scheme == "dirichlet":
        if labels is None:
            raise ValueError("partition_indices: `labels` must be given for scheme='dirichlet'.")
        y = torch.as_tensor(labels).reshape(-1)
        if len(y) != num_items:
            raise ValueError(f"partition_indices: `labels` must have {num_items} entries, got {len(y)}.")
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        if scheme == "quantity":
            perm = torch.randperm(num_items, generator=g)
            for c, chunk in enumerate(_split_by_proportions(perm, _dirichlet(alpha, num_clients, g))):
                parts[c] += chunk.tolist()
        else:
            for cls in torch.unique(y).tolist():
                idx = torch.nonzero(y == cls).reshape(-1)
                idx = idx[torch.randperm(len(idx), generator=g)]
                for c, chunk in enumerate(_split_by_proportions(idx, _dirichlet(alpha, num_clients, g))):
                    parts[c] += chunk.tolist()
        if min(len(p) for p in parts) >= min_size:
            return [sorted(p) for p in parts]
    raise ValueError(
        f"partition_indices: no draw gave every client `min_size`={min_size} items in {max_tries} tries; "
        "raise `alpha` or lower `num_clients`."
    )


def speed_factors(num_clients: int, slowest: float = 10.0, spread: str = "linear", seed: int = 0) -> list[float]:
    """Per-client time per local step, from 1 (fastest) to ``slowest``.

    ``"linear"``: evenly spaced 1..slowest in client order; ``"uniform"``: seeded draws in [1, slowest];
    ``"equal"``: all 1.
    """
    if not (isinstance(slowest, (int, float)) and slowest >= 1):
        raise ValueError(f"speed_factors: `slowest` must be >= 1, got {slowest!r}.")
    if spread == "equal" or num_clients == 1:
        return [1.0] * num_clients
    if spread == "linear":
        return [1.0 + (slowest - 1.0) * i / (num_clients - 1) for i in range(num_clients)]
    if spread == "uniform":
        g = torch.Generator().manual_seed(int(seed))
        return (1.0 + (slowest - 1.0) * torch.rand(num_clients, generator=g, dtype=torch.float64)).tolist()
    raise ValueError(f"speed_factors: `spread` must be 'linear', 'uniform' or 'equal', got {spread!r}.")


class Participation:
    """Which clients take part in a round: independent Bernoulli(p_n) draws or a fixed periodic schedule.

    Args:
        probs: p_n per client in (0, 1]; client n joins a round with probability p_n. Mutually exclusive with
            ``periods``.
        periods: per-client period in rounds (≥ 1); client n joins rounds r with ``r % period_n == 0``.
        seed: seed of the Bernoulli draws; round r uses a generator seeded by ``(seed, r)``, so the pattern needs no
            state and a resumed run draws the same participants.

    Raises:
        ValueError: if neither or both of ``probs``/``periods`` are given or a value is out of range.

    Example:
        >>> Participation(periods=[1, 2]).participants(1)
        [0]
    """

    def __init__(
        self, probs: Sequence[float] | None = None, periods: Sequence[int] | None = None, seed: int = 0
    ) -> None:
        if (probs is None) == (periods is None):
            raise ValueError("Participation: exactly one of `probs` and `periods` must be given.")
        if probs is not None and any(not 0 < float(p) <= 1 for p in probs):
            raise ValueError(f"Participation: `probs` must be in (0, 1], got {list(probs)!r}.")
        if periods is not None and any(not (int(k) == k and k >= 1) for k in periods):
            raise ValueError(f"Participation: `periods` must be ints >= 1, got {list(periods)!r}.")
        self.probs = None if probs is None else [float(p) for p in probs]
        self.periods = None if periods is None else [int(k) for k in periods]
        self.seed = int(seed)

    @property
    def num_clients(self) -> int:
        return len(self.probs if self.probs is not None else self.periods)

    def participants(self, round_idx: int) -> list[int]:
        """The client ids taking part in round ``round_idx``."""
        if self.periods is not None:
            return [n for n, k in enumerate(self.periods) if round_idx % k == 0]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(round_idx))
        draws = torch.rand(len(self.probs), generator=g, dtype=torch.float64).tolist()
        return [n for n, (u, p) in enumerate(zip(draws, self.probs)) if u < p]
