"""FedAU's server loop as the authors' code runs it (IBM/fedau ``main.py``, ``weighting_method='adaptive'``).

A literal, slow transcription over flat tensors, written from reading that loop: for each client in id order, a
participant's delta is scaled by the mean of its *already closed* participation intervals (left unscaled, weight 1,
while none is closed), and only then is this round's interval (absent rounds + 1) appended; an absent client's
counter grows and closes an interval of length K at the cutoff. The round's sum is divided by the number of clients N
(non-participants add 0) and added with the global step size.
"""

from __future__ import annotations

import torch


def fedau_authors(x0: torch.Tensor, rounds: list[dict[int, torch.Tensor]], num_clients: int, k_value: int,
                  step_size_global: float = 1.0) -> tuple[torch.Tensor, list[list[float | None]]]:
    """Runs the rounds (each a map participant id -> delta); returns the final model and each round's weights."""
    x = x0.clone()
    not_participated = [0] * num_clients
    intervals: list[list[int]] = [[] for _ in range(num_clients)]
    weights_per_round = []
    for deltas in rounds:
        acc = torch.zeros_like(x)
        used: list[float | None] = [None] * num_clients
        for n in range(num_clients):
            if n in deltas:
                update = deltas[n].clone()
                if intervals[n]:
                    used[n] = sum(intervals[n]) / len(intervals[n])
                    update = update * used[n]
                else:
                    used[n] = 1.0
                intervals[n].append(not_participated[n] + 1)
                not_participated[n] = 0
                acc = acc + update
            else:
                not_participated[n] += 1
                if not_participated[n] >= k_value:
                    intervals[n].append(not_participated[n])
                    not_participated[n] = 0
        x = x + step_size_global * acc / num_clients
        weights_per_round.append(used)
    return x, weights_per_round
