"""The identity compressor: sends the tensor as it is (the uncompressed baseline)."""

from __future__ import annotations

from torch import Tensor

from lightning_convergence.compress.base import Compressor, Payload

__all__ = ["Identity"]


class Identity(Compressor):
    """No compression: the payload is the tensor itself, carried by an all-reduce like plain DDP.

    Any error-feedback rule over :class:`Identity` reduces to plain data-parallel SGD (tested), which makes it the
    reference point for every other compressor.

    Args: none.

    Example::

        CompressedDDPStrategy(feedback="ef21", compressor=Identity())
    """

    unbiased = True
    alpha = 1.0
    summable = True

    def compress(self, tensor: Tensor, step: int = 0, key: str = "") -> Payload:
        return Payload({"values": tensor.reshape(-1)}, tensor.shape, tensor.dtype, self)

    def decompress(self, payload: Payload) -> Tensor:
        return payload.tensors["values"].reshape(payload.shape)
