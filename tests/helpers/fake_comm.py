"""A fake two-rank communicator for hand-checkable tests (torchft's trick): the other rank's message is given."""

from __future__ import annotations

import torch

from lightning_convergence.comm import Communicator


class PlusOther(Communicator):
    """Rank 0 of a pretend pair whose partner sends ``other``: all-reduces add it (flattened), all-gathers append it
    (as bytes of the same dtype)."""

    def __init__(self, other: torch.Tensor) -> None:
        self.rank, self.world_size = 0, 2
        self.other = other.reshape(-1)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.add_(self.other.to(tensor.dtype))

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        return [tensor.reshape(-1), self.other.reshape(-1).to(tensor.dtype)]
