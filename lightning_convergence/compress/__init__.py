"""Gradient compressors with one interface: ``compress(tensor, step, key) -> Payload``, ``decompress(payload)``.

Imports torch only (never ``lightning``). See :mod:`lightning_convergence.compress.base` for the contract.
"""

from lightning_convergence.compress.base import Compressor, Payload, generator_for
from lightning_convergence.compress.blockquant import BlockQuantizer
from lightning_convergence.compress.compose import Compose
from lightning_convergence.compress.cyclic_topk import CyclicTopK
from lightning_convergence.compress.identity import Identity
from lightning_convergence.compress.lowrank import LowRank
from lightning_convergence.compress.qsgd import QSGD
from lightning_convergence.compress.randk import RandK
from lightning_convergence.compress.sign import ScaledSign
from lightning_convergence.compress.topk import TopK

__all__ = [
    "QSGD", "BlockQuantizer", "Compose", "Compressor", "CyclicTopK", "Identity", "LowRank", "Payload", "RandK",
    "ScaledSign", "TopK",
    "generator_for",
]
