"""Per-example (or per-chunk) gradients of *any* module's loss on *any* batch (torch only).

The loss of a batch comes from, in order: a ``batch_loss_fn(module, batch) -> scalar`` the user passes, or the
module's own ``training_step(batch, 0)`` (its returned tensor or ``["loss"]``; ``self.log``/``self.log_dict`` are
silenced while it runs, so probes never write metrics). Batches are any nesting of tuples, lists and dicts whose
tensors share the leading batch dimension (tensors without it, and non-tensors, pass through unchanged).

Two ways to split the loss into samples:

* ``torch.func.vmap`` over ``grad`` of a functional call: exact per-example gradients in one batched pass;
* when ``vmap`` cannot trace the module (RNNs, ``.item()`` in the step, data-dependent control flow), plain
  autograd on ``chunks`` slices of the batch, one backward each; a one-time warning says so. Statistics then use the
  chunk size as their ``scale`` (:func:`~lightning_convergence.stats.sample_grad_stats`), which keeps them unbiased.

Gradients are taken with respect to detached copies of the parameters, so ``.grad`` fields and tensor hooks that
other parts register on the real parameters are never touched.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["BatchLossFn", "ExampleGradients", "batch_length", "slice_batch", "training_step_loss"]

BatchLossFn = Callable[[nn.Module, Any], Tensor]


def _leaves(batch: Any) -> list[Tensor]:
    if isinstance(batch, Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        return [t for v in batch.values() for t in _leaves(v)]
    if isinstance(batch, (list, tuple)):
        return [t for v in batch for t in _leaves(v)]
    return []


def batch_length(batch: Any) -> int:
    """Examples in ``batch``: the leading dimension of its first tensor with at least one dimension.

    Raises:
        TypeError: if ``batch`` holds no such tensor.
    """
    for t in _leaves(batch):
        if t.dim() > 0:
            return int(t.shape[0])
    raise TypeError(f"batch_length: found no tensor with a batch dimension in a {type(batch).__name__} batch.")


def _map(batch: Any, n: int, fn: Callable[[Tensor], Any]) -> Any:
    """Apply ``fn`` to every tensor whose leading dimension is ``n``; keep the container types."""
    if isinstance(batch, Tensor):
        return fn(batch) if batch.dim() > 0 and batch.shape[0] == n else batch
    if isinstance(batch, Mapping):
        return {k: _map(v, n, fn) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_map(v, n, fn) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_map(v, n, fn) for v in batch)
    return batch


def slice_batch(batch: Any, index: slice | Tensor) -> Any:
    """The examples ``index`` of ``batch`` (every tensor with the batch's leading dimension is indexed)."""
    return _map(batch, batch_length(batch), lambda t: t[index])


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


def training_step_loss(module: nn.Module, batch: Any) -> Tensor:
    """``module.training_step(batch, 0)`` as a scalar loss, with ``log``/``log_dict`` silenced while it runs.

    Raises:
        TypeError: if the module has no ``training_step`` or it returns neither a tensor nor a dict with ``"loss"``.
    """
    step = getattr(module, "training_step", None)
    if step is None:
        raise TypeError(f"{type(module).__name__} has no `training_step`; pass `batch_loss_fn(module, batch)`.")
    saved = {k: module.__dict__[k] for k in ("log", "log_dict") if k in module.__dict__}
    module.__dict__["log"] = module.__dict__["log_dict"] = _noop
    try:
        out = step(batch, 0)
    finally:
        for k in ("log", "log_dict"):
            module.__dict__.pop(k, None)
        module.__dict__.update(saved)
    if isinstance(out, Mapping):
        out = out.get("loss")
    if not isinstance(out, Tensor):
        raise TypeError(
            f"{type(module).__name__}.training_step returned {type(out).__name__}, not a loss tensor or a dict with "
            "'loss'; pass `batch_loss_fn(module, batch)`."
        )
    return out


class _Call(nn.Module):
    """Lets ``torch.func.functional_call`` run a loss of the module (its ``forward`` is the loss)."""

    def __init__(self, module: nn.Module, loss: BatchLossFn) -> None:
        super().__init__()
        self.m = module
        self._loss = loss

    def forward(self, batch: Any) -> Tensor:
        return self._loss(self.m, batch)


class ExampleGradients:
    """Per-example gradients through ``vmap``, falling back once (with a warning) to per-chunk autograd.

    Args:
        owner: the part's name, used in the warning and in errors.
        batch_loss_fn: ``batch_loss_fn(module, batch) -> scalar`` (mean over the batch's examples). Default
            ``None``: the module's ``training_step`` (see :func:`training_step_loss`).

    Attributes:
        vmap_ok: ``None`` until the first call, then whether ``vmap`` works for this module.
    """

    def __init__(self, owner: str, batch_loss_fn: BatchLossFn | None = None) -> None:
        self.owner = owner
        self.loss: BatchLossFn = batch_loss_fn if batch_loss_fn is not None else training_step_loss
        self.vmap_ok: bool | None = None

    def __call__(
        self, module: nn.Module, batch: Any, params: Mapping[str, Tensor] | None = None, chunks: int | None = None,
    ) -> tuple[dict[str, Tensor], float]:
        """Gradients of the loss on each example of ``batch``: ``({name: [n, *shape]}, 1.0)``; or, when ``vmap``
        fails, on each of ``chunks`` equal slices (default: every example), ``({name: [c, *shape]}, chunk size)``.

        Raises:
            RuntimeError: naming the part, when even the plain autograd path cannot compute the loss.
        """
        n = batch_length(batch)
        if params is None:
            params = {k: v for k, v in module.named_parameters() if v.requires_grad}
        names = list(params)
        p = {f"m.{k}": v.detach() for k, v in params.items()}
        rest = {f"m.{k}": v.detach() for k, v in module.named_parameters() if k not in params}
        rest.update({f"m.{k}": v.detach() for k, v in module.named_buffers()})
        call = _Call(module, self.loss)
        if self.vmap_ok is not False:
            try:
                grads = self._vmapped(call, p, rest, batch, n)
                self.vmap_ok = True
                return {k: grads[f"m.{k}"] for k in names}, 1.0
            except Exception as err:
                self.vmap_ok = False
                warnings.warn(
                    f"{self.owner}: per-example gradients with torch.func.vmap are not available for "
                    f"{type(module).__name__} ({type(err).__name__}: {str(err).splitlines()[0][:160]}); using one "
                    "backward pass per micro-batch slice instead (exact, slower).",
                    stacklevel=3,
                )
        c = n if chunks is None else max(min(int(chunks), n), 2 if n >= 2 else 1)
        size = n // c
        rows: list[list[Tensor]] = []
        leaves = {k: v.requires_grad_(True) for k, v in {k: t.clone() for k, t in p.items()}.items()}
        for i in range(c):
            part = slice_batch(batch, slice(i * size, (i + 1) * size))
            try:
                loss = torch.func.functional_call(call, {**rest, **leaves}, (part,))
                g = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
            except Exception as err:
                raise RuntimeError(
                    f"{self.owner}: cannot compute the loss of {type(module).__name__} on a slice of the batch "
                    f"({type(err).__name__}: {err}); pass `batch_loss_fn(module, batch)` returning the mean loss."
                ) from err
            rows.append([torch.zeros_like(v) if gi is None else gi for gi, v in zip(g, leaves.values())])
        return {k: torch.stack([r[j] for r in rows]) for j, k in enumerate(names)}, float(size)

    def _vmapped(self, call: nn.Module, p: dict[str, Tensor], rest: dict[str, Tensor], batch: Any,
                 n: int) -> dict[str, Tensor]:
        from torch.func import functional_call, grad, vmap

        dims = _in_dims(batch, n)

        def loss_one(params: dict[str, Tensor], example: Any) -> Tensor:
            return functional_call(call, {**rest, **params}, (_unsqueeze(example, dims),))

        return vmap(grad(loss_one), in_dims=(None, dims), randomness="different")(p, batch)


def _in_dims(batch: Any, n: int) -> Any:
    """vmap ``in_dims`` for ``batch``: 0 for batched tensors, ``None`` for everything else."""
    if isinstance(batch, Tensor):
        return 0 if batch.dim() > 0 and batch.shape[0] == n else None
    if isinstance(batch, Mapping):
        return {k: _in_dims(v, n) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_in_dims(v, n) for v in batch) if not hasattr(batch, "_fields") else \
            type(batch)(*(_in_dims(v, n) for v in batch))
    return None


def _unsqueeze(example: Any, dims: Any) -> Any:
    """Give every batched tensor of one example its batch dimension back (vmap strips it)."""
    if isinstance(example, Tensor):
        return example.unsqueeze(0) if dims == 0 else example
    if isinstance(example, Mapping):
        return {k: _unsqueeze(v, dims[k]) for k, v in example.items()}
    if isinstance(example, tuple) and hasattr(example, "_fields"):
        return type(example)(*(_unsqueeze(v, d) for v, d in zip(example, dims)))
    if isinstance(example, (list, tuple)):
        return type(example)(_unsqueeze(v, d) for v, d in zip(example, dims))
    return example

