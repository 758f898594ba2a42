"""Client heterogeneity for federated runs: data partitions, speed factors and participation patterns (torch only).

Every draw comes from a ``torch.Generator`` seeded by the caller (Dirichlet draws run inside a forked global RNG, so
the training's own randomness is untouched), so a partition is a pure function of its arguments.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_convergence._checks import argument_error, check_choice, check_int, check_number, check_numbers

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
    owner = "partition_indices"
    check_choice(owner, "scheme", scheme, PARTITIONS)
    check_int(owner, "num_clients", num_clients, 1)
    if num_items < num_clients * min_size:
        raise argument_error(owner, "num_items", f">= num_clients·min_size = {num_clients * min_size}", num_items)
    check_number(owner, "alpha", alpha, 0, low_open=True)
    g = torch.Generator().manual_seed(int(seed))
    if scheme == "iid":
        perm = torch.randperm(num_items, generator=g)
        return [sorted(p.tolist()) for p in torch.tensor_split(perm, num_clients)]
    if scheme == "dirichlet":
        if labels is None:
            raise argument_error(owner, "labels", "given for scheme='dirichlet'", None)
        y = torch.as_tensor(labels).reshape(-1)
        if len(y) != num_items:
            raise argument_error(owner, "labels", f"{num_items} entries", f"{len(y)} entries")
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
    check_number("speed_factors", "slowest", slowest, 1)
    check_choice("speed_factors", "spread", spread, ("linear", "uniform", "equal"))
    if spread == "equal" or num_clients == 1:
        return [1.0] * num_clients
    if spread == "linear":
        return [1.0 + (slowest - 1.0) * i / (num_clients - 1) for i in range(num_clients)]
    g = torch.Generator().manual_seed(int(seed))  # "uniform"
    return (1.0 + (slowest - 1.0) * torch.rand(num_clients, generator=g, dtype=torch.float64)).tolist()


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
        self.probs = None if probs is None else check_numbers("Participation", "probs", probs, None, 0, 1,
                                                              low_open=True)
        self.periods = None if periods is None else [check_int("Participation", "periods", k, 1) for k in periods]
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
