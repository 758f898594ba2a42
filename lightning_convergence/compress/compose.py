"""Compose two compressors: the second compresses the ``values`` of the first (e.g. Top-K then 8-bit values)."""

from __future__ import annotations

from torch import Tensor

from lightning_convergence._checks import check_instance
from lightning_convergence.compress.base import Compressor, Payload

__all__ = ["Compose"]


class Compose(Compressor):
    """Apply ``first``, then compress the ``values`` wire tensor of its payload with ``second``.

    Typical use: ``Compose(TopK(0.01), QSGD(levels=127))`` sends k indices (int32) plus k 8-bit codes and one norm,
    about 5 bytes per kept entry instead of 8. The other wire tensors of ``first`` (Top-K's indices) are sent as
    they are.

    Properties: unbiased if both are; summable if both are (Rand-K's shared indices with a linear second stage).
    Contraction: if ``first`` is a sparsifier whose kept part carries at least ``α₁·||x||²`` (Top-K) and ``second``
    is contractive with ``α₂`` on the kept values, the errors fall on disjoint supports and
    ``||C(x) − x||² ≤ (1 − α₁α₂)·||x||²``; so ``alpha = α₁·α₂`` (0 when either is 0).

    Args:
        first: the outer compressor; its payload must have a ``values`` tensor (Identity, TopK, RandK).
        second: the compressor applied to those values (QSGD, ScaledSign, Identity, ...).

    Raises:
        TypeError: if either argument is not a :class:`Compressor`.

    Example::

        compressor: {class_path: lightning_convergence.compress.Compose, init_args: {
          first: {class_path: lightning_convergence.compress.TopK, init_args: {k_fraction: 0.01}},
          second: {class_path: lightning_convergence.compress.QSGD, init_args: {levels: 127}}}}
    """

    def __init__(self, first: Compressor, second: Compressor) -> None:
        for name, value in (("first", first), ("second", second)):
            check_instance("Compose", name, value, Compressor, "a Compressor")
        self.first = first
        self.second = second
        self.unbiased = first.unbiased and second.unbiased
        self.summable = first.summable and second.summable
        self.alpha = first.alpha * second.alpha

    def contraction(self, numel: int) -> float:
        inner = self.first.k_for(numel) if hasattr(self.first, "k_for") else numel
        return self.first.contraction(numel) * self.second.contraction(inner)

    def compress(self, tensor: Tensor, step: int = 0, key: str = "") -> Payload:
        outer = self.first.compress(tensor, step, key)
        if "values" not in outer.tensors:
            raise RuntimeError(f"Compose: `first` ({type(self.first).__name__}) has no `values` tensor to compress.")
        values = outer.tensors["values"]
        inner = self.second.compress(values, step, key + "/values")
        tensors = {k: v for k, v in outer.tensors.items() if k != "values"}
        tensors.update({f"values.{k}": v for k, v in inner.tensors.items()})
        return Payload(tensors, tensor.shape, tensor.dtype, self, meta={"outer": outer, "inner": inner})

    def decompress(self, payload: Payload) -> Tensor:
        outer: Payload = payload.meta["outer"]
        inner: Payload = payload.meta["inner"]
        inner = inner.replace({k[len("values."):]: v for k, v in payload.tensors.items() if k.startswith("values.")})
        values = inner.decompress().reshape(-1)
        rest = {k: v for k, v in payload.tensors.items() if not k.startswith("values.")}
        return outer.replace({**rest, "values": values.to(outer.tensors["values"].dtype)}).decompress()
