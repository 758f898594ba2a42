"""Classic error feedback (error accumulation): compress the gradient plus the error left over so far."""

from __future__ import annotations

from torch import Tensor

from lightning_convergence.compress.base import Compressor, Payload
from lightning_convergence.feedback.base import FeedbackRule, get_buffer

__all__ = ["EF14", "ef14_input", "ef14_commit"]


def ef14_input(e: dict[str, Tensor], key: str, grad: Tensor) -> Tensor:
    """The compressor's input ``p = ∇f_i + e_i`` (``e_i = 0`` before the first message)."""
    old = get_buffer(e, key, grad)
    return grad if old is None else grad + old


def ef14_commit(e: dict[str, Tensor], key: str, p: Tensor, sent: Tensor) -> Tensor:
    """``e_i ← p − sent``: ``sent`` is this worker's decompressed message ``c_i`` (or, with ``error="average"``, the
    decompressed average). Returns the new ``e_i``."""
    e[key] = p - sent
    return e[key]


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

    def _inputs(self, key: str, x: Tensor) -> tuple[Tensor]:
        return (ef14_input(self.buffers["e"], key, x),)

    def _commit(self, key: str, x: Tensor, inputs: tuple[Tensor, ...], delta: Tensor) -> Tensor:
        return ef14_commit(self.buffers["e"], key, inputs[0], delta)

    def _message(self, key: str, x: Tensor, compressor: Compressor, step: int) -> Payload:
        if getattr(compressor, "error", None) == "average":  # the error waits for the average (update)
            self._input[key] = p = self._current_inputs(key, x)[0]  # type: ignore[index]
            return compressor.compress(p, step, key)
        return super()._message(key, x, compressor, step)

    def update(self, key: str, mean: Tensor) -> Tensor:
        p = self._input.pop(key, None)
        if p is not None:  # error="average": e_i = p_i − the decompressed average
            self.residuals[key] = ef14_commit(self.buffers["e"], key, p, mean.reshape(p.shape).to(p.dtype))
        return mean
