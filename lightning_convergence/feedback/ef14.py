"""Classic error feedback (error accumulation): compress the gradient plus the error left over so far."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_convergence.compress.base import Compressor, Payload
from lightning_convergence.feedback.base import FeedbackRule, get_buffer

__all__ = ["EF14", "ef14_worker_step"]


def ef14_input(e: dict[str, Tensor], key: str, grad: Tensor) -> Tensor:
    """The compressor's input ``p = ∇f_i + e_i``."""
    old = get_buffer(e, key, grad)
    return grad if old is None else grad + old


def ef14_worker_step(
    e: dict[str, Tensor], key: str, grad: Tensor, compressor: Compressor, step: int
) -> tuple[Payload, Tensor]:
    """Worker ``i``: ``p = ∇f_i + e_i``, ``c_i = C(p)``, ``e_i ← p − c_i``. Returns the message and the new ``e_i``."""
    p = ef14_input(e, key, grad)
    payload = compressor.compress(p, step, key)
    e[key] = p - payload.decompress().reshape(grad.shape).to(grad.dtype)
    return payload, e[key]


class EF14(FeedbackRule):
    """Classic error feedback: every worker adds its accumulated compression error before compressing.

    Papers: Seide, Fu, Droppo, Li, Yu. *1-Bit Stochastic Gradient Descent and its Application to Data-Parallel
    Distributed Training of Speech DNNs.* Interspeech 2014 (the "EF14" of the EF21 paper); analysed by Stich,
    Cordonnier, Jaggi, NeurIPS 2018 (arXiv:1809.07599) and Karimireddy et al., ICML 2019 (arXiv:1901.09847)::

        p_i = ∇f_i(x) + e_i;   c_i = C(p_i);   e_i ← p_i − c_i;   x ← x − γ (1/n) Σ_i c_i

    With a compressor whose ``error`` is ``"average"`` (``LowRank(error="average")``, torch's PowerSGD hook), the
    error is set once the average is known: ``e_i ← p_i − (1/n) Σ_j c_j`` (:meth:`update`), as PowerSGD's authors
    and torch do; the average over workers is the same as with ``e_i ← p_i − c_i``.

    Deviations: the error is kept in gradient units (like torch's PowerSGD hook), not multiplied by the learning
    rate as in Karimireddy et al. (``p = γ g + e``). The two agree for a constant learning rate; under a schedule
    the stored error is re-scaled implicitly by the new rate. Minibatch gradients replace ``∇f_i``.

    Args: none (the compressor is the only choice).

    State: per-parameter error ``e_i`` (buffer ``e``) by parameter name, step counts, the non-finite skip count, a
    ``version`` key. The logged residual is ``||e_i||²``.

    Example::

        CompressedDDPStrategy(feedback=EF14(), compressor=ScaledSign())
    """

    name = "ef14"
    buffer_names = ("e",)
    supports_average_error = True

    def __init__(self) -> None:
        super().__init__()
        self._input: dict[str, Tensor] = {}  # error="average": this step's p_i until update() sees the average

    def _message(self, key: str, x: Tensor, compressor: Compressor, step: int) -> Payload:
        if getattr(compressor, "error", None) == "average":
            self._input[key] = p = ef14_input(self.buffers["e"], key, x)
            return compressor.compress(p, step, key)
        payload, e = ef14_worker_step(self.buffers["e"], key, x, compressor, step)
        self._set_residual(key, e)
        return payload

    def compressor_input(self, key: str, grad: Tensor) -> Tensor | None:
        return ef14_input(self.buffers["e"], key, grad.detach().to(torch.float32))

    def update(self, key: str, mean: Tensor) -> Tensor:
        p = self._input.pop(key, None)
        if p is not None:  # error="average": e_i = p_i − the decompressed average
            self.buffers["e"][key] = e = p - mean.reshape(p.shape).to(p.dtype)
            self._set_residual(key, e)
        return mean


