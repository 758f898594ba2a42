"""What every error-feedback rule shares: the rule interface, state (de)serialisation and non-finite handling.

A rule turns one worker's gradient for one parameter into a compressed message (:meth:`FeedbackRule.message`) and
turns the average of all workers' decompressed messages into the gradient the optimizer uses
(:meth:`FeedbackRule.update`). State is keyed by parameter *name*, never by DDP bucket index, so it survives bucket
rebuilds and resumes with other bucket sizes. Communication is not done here: the caller averages the messages
(a DDP comm hook, or a fake all-reduce in tests).

Non-finite gradients: a parameter whose local gradient holds NaN/inf sends an all-zero message of the usual shape
(so collectives still match across ranks) and leaves its state untouched. With a device flag (the DDP comm hook)
the message is zeroed on the device without a host sync, and the old state is put back by
:meth:`FeedbackRule.end_step` once the caller knows the step's flags (one host read per step); with a host bool
it is counted here in ``nonfinite_skipped_total``.

Imports torch only.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from lightning_convergence._checks import argument_error
from lightning_convergence.compress.base import Compressor, Payload
from lightning_convergence.compress.identity import Identity
from lightning_convergence.stats import all_finite, sq_norm

__all__ = ["FeedbackRule", "NoFeedback", "FEEDBACK_STATE_VERSION", "DENSE"]

FEEDBACK_STATE_VERSION = 1
DENSE = Identity()  # the codec of uncompressed first-step messages
_NOT_READY = object()  # no compressor_input() result kept for this message


def get_buffer(buffers: dict[str, Tensor], key: str, like: Tensor) -> Tensor | None:
    """``buffers[key]`` moved to ``like``'s device and dtype once (state loaded from a checkpoint sits on CPU)."""
    buf = buffers.get(key)
    if buf is not None and (buf.device != like.device or buf.dtype != like.dtype):
        buf = buffers[key] = buf.to(device=like.device, dtype=like.dtype)
    return buf


def zero_message(compressor: Compressor, like: Tensor, step: int, key: str, dense: bool) -> Payload:
    """A message that decompresses to zero with the same wire structure as a real one."""
    return (DENSE if dense else compressor).compress(torch.zeros_like(like), step, key)


class FeedbackRule:
    """Base class of the rules. Subclasses define ``name``, their buffers, the worker formula as :meth:`_inputs`
    (up to the compressor; shared by :meth:`message` and :meth:`compressor_input`) and :meth:`_commit` (the state
    update once the own message is known), and :meth:`update` (from the average). A rule may override
    :meth:`_message` instead; it then supports single-round compressors only.

    Attributes:
        name: registered short name (``"ef21"``, ...).
        buffer_names: names of the per-parameter tensor dicts in the state.
        needs_contraction: the rule's theory assumes a contractive compressor (``alpha > 0``).
        supports_average_error: the rule sets its error from the average, for ``LowRank(error="average")``.
        first_buffers, start_buffers, server_buffers: the worker buffers a first message creates, those a dense
            first message sets to the gradient (the others start at zero), and the buffers updated from the average.
    """

    name = "base"
    buffer_names: tuple[str, ...] = ()
    needs_contraction = True
    supports_average_error = False  # can set its error from the average (a compressor with ``error="average"``)
    dense_first_step = False  # rules with a dense first message set it per instance
    start_buffers: tuple[str, ...] = ()  # worker buffers a dense first message sets to the gradient
    first_buffers: tuple[str, ...] = ()  # worker buffers that exist once a parameter has sent its first message
    server_buffers: tuple[str, ...] = ()  # buffers updated from the average (the same on every rank)

    def __init__(self) -> None:
        self.buffers: dict[str, dict[str, Tensor]] = {b: {} for b in self.buffer_names}
        self.steps: dict[str, int] = {}
        self.residuals: dict[str, Tensor] = {}  # this step's error state per parameter (its norm is computed lazily)
        self.nonfinite_skipped_total = 0
        self._prepared: dict[str, tuple[Tensor, int, int, Any]] = {}  # compressor_input() results for message()
        self._ready: Any = _NOT_READY  # the kept inputs of the message being built
        self._undo: dict[str, tuple[Tensor, dict[str, Tensor | None]]] = {}  # flagged messages of this step

    # -- the two steps -------------------------------------------------------------------------------------------
    def message(
        self, key: str, grad: Tensor, compressor: Compressor, finite: bool | Tensor | None = None
    ) -> Payload:
        """This worker's message for parameter ``key`` (updates the worker-side state).

        ``finite`` may be a 0-dim bool tensor on the gradient's device (the comm hook's flag, no host sync): the
        message is all zeros where it is false, and the caller
        calls :meth:`end_step` once the step's flags are known (:meth:`_message_masked`). A Python bool (or
        ``None``: checked here, one host sync) takes the branch on the host and counts the skip in
        ``nonfinite_skipped_total``.
        """
        x = grad.detach().to(torch.float32)
        step = self.steps.get(key, 0)
        self._ready = self._take_prepared(key, grad, step)
        self.steps[key] = step + 1
        if isinstance(finite, Tensor):
            return self._message_masked(key, x, compressor, step, finite)
        if finite is None:
            finite = all_finite([x])
        if not finite:
            self.nonfinite_skipped_total += 1
            return self._skip(key, x, compressor, step)
        return self._message(key, x, compressor, step)

    def _message_masked(self, key: str, x: Tensor, compressor: Compressor, step: int, finite: Tensor) -> Payload:
        """:meth:`_message` on ``x`` as it is (NaN/inf included) and a zero message where ``finite`` is false. The
        state moves on; its old tensors are kept (rules replace their buffers rather than writing into them: no
        copy) until :meth:`end_step` either drops them or, on a rank whose flag was false, puts them back."""
        self._undo[key] = (finite, {b: self.buffers[b].get(key) for b in self.buffer_names
                                    if b not in self.server_buffers})
        payload = self._message(key, x, compressor, step)
        return payload.replace({n: torch.where(finite, t, 0) for n, t in payload.tensors.items()})

    def end_step(self, any_flagged: bool) -> None:
        """Close an optimizer step of flagged messages (``message(..., finite=<tensor>)``): when any rank was flagged
        (the caller's one host read per step), every parameter whose flag was false on this rank gets its worker
        buffers back (one it had none of starts at zero, as :meth:`_skip` does) and reports no error state;
        otherwise the kept old tensors are dropped."""
        undo, self._undo = self._undo, {}
        if not any_flagged or not undo:
            return
        flags = torch.stack([f.reshape(()).to("cpu") for f, _ in undo.values()]).tolist()  # the rare path only
        for ok, (key, (_, old)) in zip(flags, undo.items()):
            if ok:
                continue
            self.residuals.pop(key, None)
            for b, before in old.items():
                new = self.buffers[b].get(key)
                if new is not None and new is not before:
                    self.buffers[b][key] = torch.zeros_like(new) if before is None else before

    def update(self, key: str, mean: Tensor) -> Tensor:  # pragma: no cover - abstract
        """The gradient estimate for ``key`` given the average of all workers' decompressed messages."""
        raise NotImplementedError

    def compressor_input(self, key: str, grad: Tensor) -> Tensor | None:
        """What :meth:`message` would hand to the compressor for this finite ``grad`` now, without changing state.

        ``None`` when the message would be sent uncompressed (the first step with ``dense_first_step``).
        Multi-round compressors (``LowRank(rounds=2)``, PowerSGD's two all-reduces) need it to run their first
        round on exactly the tensor that is compressed afterwards. The result is kept for the next :meth:`message`
        on the same, unmodified ``grad`` tensor, which then does not compute it again.
        """
        inputs = self._inputs(key, grad.detach().to(torch.float32))
        self._prepared[key] = (grad, grad._version, self.steps.get(key, 0), inputs)
        return None if inputs is None else inputs[0]

    def _take_prepared(self, key: str, grad: Tensor, step: int) -> Any:
        """The inputs :meth:`compressor_input` computed for this very ``grad`` at this step, else ``_NOT_READY``."""
        kept = self._prepared.pop(key, None)
        if kept is not None and kept[0] is grad and kept[1] == grad._version and kept[2] == step:
            return kept[3]
        return _NOT_READY

    def _current_inputs(self, key: str, x: Tensor) -> tuple[Tensor, ...] | None:
        """:meth:`_inputs` for the message being built (kept from :meth:`compressor_input` when it was asked)."""
        ready, self._ready = self._ready, _NOT_READY
        return self._inputs(key, x) if ready is _NOT_READY else ready

    def _inputs(self, key: str, x: Tensor) -> tuple[Tensor, ...] | None:
        """The rule's worker formula up to the compressor, without changing state: ``(compressor input, *terms the
        state update reuses)``, or ``None`` when the message is the uncompressed gradient (a dense first step)."""
        raise NotImplementedError(f"{type(self).__name__} does not support multi-round compressors.")

    def _commit(self, key: str, x: Tensor, inputs: tuple[Tensor, ...], delta: Tensor) -> Tensor | None:
        """The worker-side state update once this rank's message decompresses to ``delta``; returns the error state
        to report (``None``: none)."""
        raise NotImplementedError

    def _message(self, key: str, x: Tensor, compressor: Compressor, step: int) -> Payload:
        """One worker formula for every rule: :meth:`_inputs` (shared with :meth:`compressor_input`), compress,
        :meth:`_commit`; a dense first message sets :attr:`start_buffers` to the gradient, other worker buffers to
        zero."""
        inputs = self._current_inputs(key, x)
        if inputs is None:
            for b in self.first_buffers:
                self.buffers[b][key] = x.clone() if b in self.start_buffers else torch.zeros_like(x)
            self.residuals.pop(key, None)  # the error state starts at zero
            return DENSE.compress(x, step, key)
        payload = compressor.compress(inputs[0], step, key)
        residual = self._commit(key, x, inputs, payload.decompress().reshape(x.shape).to(x.dtype))
        if residual is not None:
            self.residuals[key] = residual
        return payload

    def _skip(self, key: str, x: Tensor, compressor: Compressor, step: int) -> Payload:
        """A non-finite step: a zero message; a parameter's first message still creates its buffers (at zero), so
        ``g = mean_i g_i`` keeps holding on every rank."""
        first = bool(self.first_buffers) and key not in self.buffers[self.first_buffers[0]]
        if first:
            for b in self.first_buffers:
                self.buffers[b][key] = torch.zeros_like(x)
        return zero_message(compressor, x, step, key, dense=first and self.dense_first_step)

    # -- diagnostics ---------------------------------------------------------------------------------------------
    def residual_sq_total(self) -> Tensor:
        """Sum over parameters of this worker's squared error-state norm (see each rule's ``State:``)."""
        if not self.residuals:
            return torch.zeros(())
        vals = list(self.residuals.values())
        return sq_norm(v.to(vals[0].device) for v in vals)  # one fused norm, only when asked (a logging step)

    def check_compressor(self, compressor: Compressor) -> None:
        """Warn when ``compressor`` does not fit the rule's theory (not contractive).

        Raises:
            ValueError: for a compressor with ``error="average"`` and a rule that cannot honour it.
        """
        if getattr(compressor, "error", None) == "average" and not self.supports_average_error:
            raise argument_error(
                type(self).__name__, "compressor", "a compressor with `error` 'projection' (only 'ef14' takes the "
                "error against the decompressed average)", repr(compressor),
                hint="Use feedback='ef14' or error='projection'.")
        if self.needs_contraction and compressor.contraction(1_000_000) <= 0.0:
            warnings.warn(
                f"{type(self).__name__}: `compressor` {compressor!r} is not a contraction (alpha = 0), which this "
                "rule's theory assumes; it may diverge. Use a contractive compressor (TopK, RandK(rescale=False), "
                "ScaledSign) or `feedback='none'` for unbiased ones.",
                stacklevel=3,
            )

    # -- state ---------------------------------------------------------------------------------------------------
    def hparams(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Tensors and Python scalars only (``torch.load(weights_only=True)`` can read it)."""
        return {
            "version": FEEDBACK_STATE_VERSION,
            "rule": self.name,
            "hparams": self.hparams(),
            "steps": dict(self.steps),
            "nonfinite_skipped_total": self.nonfinite_skipped_total,
            "buffers": {b: {k: v.detach().clone() for k, v in d.items()} for b, d in self.buffers.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore training state; hyperparameters stay as configured (a warning names any that differ).

        Raises:
            RuntimeError: for an unknown ``version`` or a state written by another rule.
        """
        owner = type(self).__name__
        if state.get("version") != FEEDBACK_STATE_VERSION:
            raise RuntimeError(f"{owner}: feedback state `version` {state.get('version')!r} is not supported.")
        if state.get("rule") != self.name:
            raise RuntimeError(f"{owner}: checkpoint holds state of rule {state.get('rule')!r}, not {self.name!r}.")
        for field, old in state.get("hparams", {}).items():
            new = self.hparams().get(field)
            if new != old:
                warnings.warn(f"{owner}: `{field}` is {new!r} now but was {old!r} in the checkpoint.", stacklevel=2)
        self.steps = {k: int(v) for k, v in state["steps"].items()}
        self.nonfinite_skipped_total = int(state["nonfinite_skipped_total"])
        for b in self.buffer_names:
            self.buffers[b] = {k: v.clone() for k, v in state["buffers"].get(b, {}).items()}
        self.residuals, self._prepared, self._undo = {}, {}, {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hparams().items())
        return f"{type(self).__name__}({args})"


class NoFeedback(FeedbackRule):
    """Compressed averaging without error feedback: ``g = (1/n) Σ_i C(∇f_i)``.

    The baseline the feedback rules are measured against. Converges with unbiased compressors (Rand-K with
    rescaling, QSGD) at a higher variance; with biased ones (Top-K, sign) it generally does not reach the optimum.

    Args: none.  State: step counts only.  Example: ``CompressedDDPStrategy(feedback="none", compressor=QSGD())``
    """

    name = "none"
    needs_contraction = False

    def _inputs(self, key: str, x: Tensor) -> tuple[Tensor, ...] | None:
        return (x,)

    def _commit(self, key: str, x: Tensor, inputs: tuple[Tensor, ...], delta: Tensor) -> None:
        return None

    def update(self, key: str, mean: Tensor) -> Tensor:
        return mean
