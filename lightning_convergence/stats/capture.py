"""One optimizer step's gradient samples, captured without extra backward passes (torch only).

Used by ``GradientStatsMonitor`` (streaming: the noise scale), ``AdaptiveBatchSize`` (every estimator) and, through
the monitor, ``ConvergenceEarlyStopping``: the single implementation of the micro-batch gradient capture.

Three ways to turn a step into :class:`~lightning_convergence.SampleGradStats`, all through ``stats``:

* ``microbatch`` with copies: tensor hooks copy each micro-batch's local gradient (before accumulation sums it and
  before DDP all-reduces it); ``sample_grad_stats`` reduces the ``k × devices`` samples across ranks.
* ``microbatch`` streaming (norm test, noise scale): the hooks only add each micro-batch's squared norm; with the
  step's all-reduced gradient, ``stats.estimate_noise`` gives the same unbiased ``tr Σ`` without any copy.
* ``per_sample``: per-example gradients of the module's loss (``module_grads.ExampleGradients``: ``vmap``, or
  micro-batch slices where ``vmap`` cannot trace the model) on a sub-batch of the step's last micro-batch.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_convergence.stats.module_grads import BatchLossFn, ExampleGradients, batch_length, slice_batch
from lightning_convergence.stats.noise_scale import NoiseEstimate, estimate_noise
from lightning_convergence.stats.norms import grads_of, sq_norm
from lightning_convergence.stats.variance import SampleGradStats, sample_grad_stats

_FALLBACK_CHUNKS = 8  # micro-batch slices per probe when vmap cannot trace the model

__all__ = ["StepGradientSamples"]


class StepGradientSamples:
    """Collects what one optimizer step needs for its gradient statistics; see the module docstring.

    Args:
        estimator: ``"microbatch"`` or ``"per_sample"``.
        streaming: with ``microbatch``, keep only squared norms (``inner_var`` is then reported as 0).
        per_sample_max_examples: examples of the last micro-batch used by ``per_sample``.
        owner: name used in error messages.
    """

    def __init__(self, estimator: str, streaming: bool, per_sample_max_examples: int, owner: str) -> None:
        self.estimator = estimator
        self.streaming_requested = streaming
        self.streaming = streaming and estimator == "microbatch"
        self.per_sample_max_examples = per_sample_max_examples
        self.owner = owner
        self.capturing = False
        self.capture_s = 0.0  # time spent in the hooks since the last `take_capture_time`
        self.params: list[torch.nn.Parameter] = []
        self._handles: list[Any] = []
        self._row: list[Tensor | None] = []
        self._rows: list[list[Tensor | None]] = []
        self._sq_parts: list[Tensor] = []
        self._sizes: list[int] = []
        self._last_batch: Any = None
        self._example_grads: ExampleGradients | None = None

    def set_estimator(self, estimator: str) -> None:
        """Switch between ``"microbatch"`` and ``"per_sample"`` before :meth:`attach` (an ``"auto"`` choice)."""
        self.estimator = estimator
        self.streaming = self.streaming_requested and estimator == "microbatch"

    # -- wiring -----------------------------------------------------------------------------------------------
    def attach(self, params: list[torch.nn.Parameter]) -> None:
        """Remember the trainable parameters and, for ``microbatch``, hook each one (once)."""
        self.params = params
        if self.estimator == "microbatch" and not self._handles:
            self._handles = [p.register_hook(self._make_hook(i)) for i, p in enumerate(params)]

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def begin_batch(self, batch: Any, size: int, capturing: bool) -> None:
        """Called at every micro-batch start; ``capturing`` says whether this step is a test step."""
        self.capturing = capturing
        if capturing:
            self._sizes.append(size)
            if self.estimator == "per_sample":
                self._last_batch = batch

    def end_backward(self) -> None:
        """Called after each micro-batch's backward: close this micro-batch's row of copies."""
        if self.capturing and self.estimator == "microbatch" and not self.streaming:
            self._rows.append(self._row or [None] * len(self.params))
            self._row = []

    def reset(self) -> None:
        self._rows, self._row, self._sq_parts, self._sizes, self._last_batch = [], [], [], [], None
        self.capturing = False

    def take_capture_time(self) -> float:
        t, self.capture_s = self.capture_s, 0.0
        return t

    def _make_hook(self, index: int) -> Callable[[Tensor], Tensor]:
        def hook(grad: Tensor) -> Tensor:
            if self.capturing:
                t0 = time.perf_counter()
                g = grad.detach().float()
                if self.streaming:  # only Σ_i ‖x_i‖² is needed: no copies, memory stays flat
                    flat = g.reshape(-1)
                    # One fused kernel per hook (no temporary, no running sum); summed once in `noise`.
                    self._sq_parts.append(torch.dot(flat, flat))
                else:
                    if not self._row:
                        self._row = [None] * len(self.params)
                    prev = self._row[index]
                    self._row[index] = g.clone() if prev is None else prev + g
                self.capture_s += time.perf_counter() - t0
            return grad

        return hook

    # -- statistics -------------------------------------------------------------------------------------------
    def stats(
        self, world_size: int, loss_factor: float, all_reduce: Any, pl_module: torch.nn.Module,
        loss_fn: BatchLossFn | None, global_batch: int,
    ) -> SampleGradStats | None:
        """This step's statistics, or ``None`` when there is no measurement (a lone micro-batch, no gradient).

        Args:
            world_size: number of ranks.
            loss_factor: what the hooks' gradients must be multiplied by to be micro-batch means (Lightning divides
                each micro-batch loss by the accumulation factor; AMP multiplies it by the loss scale).
            all_reduce: in-place SUM all-reduce, or ``None`` on one process.
            pl_module: the module (for ``per_sample``).
            loss_fn: ``loss_fn(module, batch)`` mean loss for ``per_sample``; ``None``: the module's ``training_step``.
            global_batch: examples in the step (the count reported by ``per_sample``).
        """
        if self.estimator == "per_sample":
            return self._per_sample(all_reduce, pl_module, loss_fn, global_batch)
        if len(self._sizes) * world_size < 2:
            return None  # a lone micro-batch (the short last step of an epoch): no variance, no measurement
        if self.streaming:
            return self._streamed(loss_factor, all_reduce)
        scale = sum(self._sizes) / len(self._sizes)
        samples = []
        for i, p in enumerate(self.params):
            parts = [r[i] if r[i] is not None else torch.zeros(p.shape, device=p.device) for r in self._rows]
            samples.append(torch.stack(parts) * loss_factor)
        return sample_grad_stats(samples, scale=scale, all_reduce=all_reduce)

    def noise(
        self, loss_factor: float, all_reduce: Any, big_sq_norm: float | Tensor | None = None
    ) -> tuple[NoiseEstimate, int] | None:
        """Streaming only: the unbiased two-batch-size estimate (McCandlish et al., App. A) of this step and the
        number of examples it covers, or ``None`` without a measurement (one micro-batch on one rank, no gradient).

        ``b_small`` is the mean micro-batch size, ``b_big`` all micro-batches of all ranks; the small squared
        norms are averaged over micro-batches and ranks (one all-reduce of two numbers), the big one is the step's
        all-reduced gradient (pass ``big_sq_norm`` when it is already known). Estimates are raw (they can be
        negative): average them, never clamp them one by one.
        """
        full = grads_of(self.params)
        if not self.streaming or not self._sq_parts or not full or not self._sizes:
            return None
        sq_local = torch.stack(self._sq_parts).double().sum()
        buf = torch.stack([
            sq_local * loss_factor**2,
            torch.tensor(float(len(self._sizes)), dtype=torch.float64, device=sq_local.device),
        ])
        if all_reduce is not None:
            all_reduce(buf)
        n = float(buf[1])
        if n < 2:
            return None
        scale = sum(self._sizes) / len(self._sizes)
        big = sq_norm(full) if big_sq_norm is None else big_sq_norm
        est = estimate_noise(float(buf[0]) / n, big, scale, scale * n)
        return est, int(round(scale * n))

    def _streamed(self, loss_factor: float, all_reduce: Any) -> SampleGradStats | None:
        """The mean squared micro-batch norm and the step's (all-reduced) gradient give tr Σ through the two-batch
        estimator, which equals the sample variance of the micro-batch means (see ``stats.noise_estimate``)."""
        measured = self.noise(loss_factor, all_reduce)
        if measured is None:
            return None
        est, count = measured
        g2 = float(sq_norm(grads_of(self.params)))
        return SampleGradStats(count=count, trace_cov=max(est.trace_cov, 0.0), grad_sq_norm=g2, inner_var=0.0)

    def _per_sample(
        self, all_reduce: Any, pl_module: torch.nn.Module, loss_fn: Any, global_batch: int
    ) -> SampleGradStats | None:
        batch = self._last_batch
        if batch is None:
            return None
        sub_batch = slice_batch(batch, slice(0, self.per_sample_max_examples))
        if batch_length(sub_batch) < 2:
            return None  # one example: no variance (every rank gets the same sizes from the same sampler)
        if self._example_grads is None:  # one per run: the vmap decision and its warning happen once
            self._example_grads = ExampleGradients(self.owner, loss_fn)
        params = {n: p for n, p in pl_module.named_parameters() if p.requires_grad}
        grads, scale = self._example_grads(pl_module, sub_batch, params, chunks=_FALLBACK_CHUNKS)
        sub = sample_grad_stats([grads[n] for n in params], scale=scale, all_reduce=all_reduce)
        # The tests' denominator is the norm of the step's whole gradient (all micro-batches and ranks, already
        # all-reduced and unscaled here), as in AdAdaGrad where the per-example gradients cover the whole batch.
        full = grads_of(self.params)
        if not full:
            return None
        return dataclasses.replace(sub, grad_sq_norm=float(sq_norm(full)), count=global_batch)
