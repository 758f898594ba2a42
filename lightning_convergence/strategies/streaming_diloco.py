"""``StreamingDiLoCoStrategy``: the local-SGD strategy with fragment-wise, overlapped, quantized DiLoCo outer steps.

The adapter only wires hooks: the math is :class:`~lightning_convergence.averaging.StreamingDiLoCo`. It calls the core
after every optimizer step (the core's schedule decides, by integer compares, whether a fragment launches, advances
or merges), runs the outer collectives on a process group of their own, and logs what the syncs did.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from typing_extensions import override

from lightning_convergence._metrics import log_metrics
from lightning_convergence._nonfinite import act_on_nonfinite, check_nonfinite_policy
from lightning_convergence.averaging.base import flatten, unflatten_into
from lightning_convergence.averaging.streaming import StreamingDiLoCo
from lightning_convergence.comm import Communicator, SingleProcessCommunicator, TorchDistCommunicator, done
from lightning_convergence.strategies.local_sgd import LocalSGDStrategy

__all__ = ["StreamingDiLoCoStrategy", "layer_blocks", "register_strategies"]

_NUMERIC = re.compile(r"^\d+$")


def layer_blocks(names: list[str]) -> list[list[int]]:
    """Group parameter names (in model order) into layer blocks: the path up to the first numeric component
    (``blocks.layers.3.linear1.weight`` → ``blocks.layers.3``), else the owning module (``head.weight`` → ``head``),
    else the name itself (a parameter registered on the root module). Returns parameter indices per block."""
    order: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        parts = name.split(".")
        cut = next((k + 1 for k, part in enumerate(parts) if _NUMERIC.match(part)), None)
        key = ".".join(parts[:cut]) if cut is not None else (".".join(parts[:-1]) or name)
        order.setdefault(key, []).append(i)
    return list(order.values())


class StreamingDiLoCoStrategy(LocalSGDStrategy):
    """Streaming DiLoCo on Lightning: P fragments of layer blocks, staggered outer syncs overlapped with τ inner steps,
    4-bit or int8 outer gradients, optional eager updates.

    Requirements: one optimizer; at least ``num_fragments`` layer blocks in the model; the schedule counts optimizer
    steps (gradient accumulation is fine). Runs on gloo (CPU); NCCL/CUDA is written device-agnostic but unchecked.

    Papers: Douillard et al. *Streaming DiLoCo with overlapping communication: Towards a Distributed Free Lunch.*
    arXiv:2501.18512 (2025); Kale, Douillard, Donchev. *Eager Updates For Overlapped Communication and Computation in
    DiLoCo.* arXiv:2502.12996 (2025). See :class:`~lightning_convergence.averaging.StreamingDiLoCo` for the update,
    its deviations, and the card ``docs/algorithms/streaming_diloco.md``.

    Deviations from :class:`LocalSGDStrategy`: the outer collectives run on a dedicated process group created at setup
    (``dist.new_group``), so the asynchronous all-reduce in flight never orders against validation or logging
    collectives; no collective blocks a merge: each launch also starts, on that group, a small all-reduce of "did
    this rank drop a non-finite step" (acted on at the merge), and the round's last launch carries the float buffers
    too (at its merge each rank's buffers become the launch-time mean plus their own change since); the inner
    optimizer's state is kept (``optimizer_state="keep"``); no DDP warm-up phase; the final merge is one last
    quantized outer step of every fragment (:meth:`StreamingDiLoCo.finalize`), not a float32 average.

    Args:
        num_fragments: P, fragments of layer blocks, ≥ 1. Default 4 (needs ≥ 4 layer blocks).
        sync_every: H, inner steps between two syncs of one fragment, ≥ P. Default 32.
        overlap_steps: τ in [0, ⌊H/P⌋), inner steps an outer all-reduce travels before it is merged. Default 1.
        mixing: α in [0, 1], weight of the local fragment at the merge. Default 0.5.
        eager: eager updates (start from the proxy outer step, correct on arrival). Default ``False``.
        quantization: ``None``, ``"int8"``, ``"fp4_e2m1"``, ``"fp4_e3m0"`` (paper; default).
        block_size: entries per quantization scale. Default 256.
        outer_lr: outer learning rate (0.7). outer_momentum: outer Nesterov momentum (0.9). nesterov: default True.
        partition: ``"strided"`` (default, paper) or ``"contiguous"``.
        on_nonfinite: ``"stop"`` (default) or ``"skip"``: what a non-finite averaged pseudo-gradient does (the
            fragment's round is never applied either way).
        sync_buffers, final_merge, average_for_eval, **kwargs: as in :class:`LocalSGDStrategy`.

    State (per rank, in the checkpoint under ``convergence/local_sgd``): the local-SGD state (step, counters, this
    rank's replica and inner optimizer state) with the core's per-fragment anchors, momenta and the fragment in flight
    (its mean waited for at save time), plus ``link_bytes_total`` and ``peak_step_bytes``.

    Logs: ``convergence/local_sgd/sync_rounds_total`` (fragment merges), ``bytes_sent_total`` (link bytes this rank
    sent for training, all its communicators), ``link_bytes_total`` (the outer means' share), ``fragment_sync_bytes``
    (this rank's link bytes of the last fragment sync), ``peak_step_bytes`` (most link bytes this rank issued in any
    one step), ``sync_wait_ms`` (time blocked waiting for the last merge's mean: 0 when the overlap hid it),
    ``pseudo_grad_norm``, ``replica_divergence``, ``quantization_error`` (root mean over ranks of
    ``‖Q(Δ_i)−Δ_i‖/‖Δ_i‖``), ``nonfinite_skipped_total``; all under ``convergence/local_sgd/``, at merges, at most
    every ``log_every_n_steps``.

    Raises:
        ValueError: a hyperparameter out of range (from the core), an unknown ``on_nonfinite``, or more fragments than
            layer blocks (at setup).

    Example:
        >>> strategy = StreamingDiLoCoStrategy(num_fragments=2, sync_every=32, overlap_steps=4)
        >>> # Trainer(accelerator="cpu", devices=2, strategy=strategy)   or   Trainer(strategy="streaming_diloco")
    """

    def __init__(
        self, num_fragments: int = 4, sync_every: int = 32, overlap_steps: int = 1, mixing: float = 0.5,
        eager: bool = False, quantization: str | None = "fp4_e3m0", block_size: int = 256, outer_lr: float = 0.7,
        outer_momentum: float = 0.9, nesterov: bool = True, partition: str = "strided", on_nonfinite: str = "stop",
        sync_buffers: bool = True, final_merge: bool = True, average_for_eval: bool = True, **kwargs: Any,
    ) -> None:
        outer = StreamingDiLoCo(num_fragments, sync_every, overlap_steps, mixing, eager, quantization, block_size,
                                outer_lr, outer_momentum, nesterov, partition)
        check_nonfinite_policy("StreamingDiLoCoStrategy", on_nonfinite)
        super().__init__(outer=outer, schedule=1, sync_buffers=sync_buffers, optimizer_state="keep",
                         final_merge=final_merge, average_for_eval=average_for_eval, on_nonfinite=on_nonfinite,
                         **kwargs)
        self._outer_comm: Communicator | None = None
        self._outer_group: Any = None
        self._peak_step_bytes = 0
        self._warned = False
        # the side all-reduce riding with the fragment in flight: (pending mean of [flag, buffers?], buffers sent)
        self._side: tuple[Any, Tensor | None] | None = None

    @override
    def setup(self, trainer: Any) -> None:
        names = [n for n, _ in self.lightning_module.named_parameters()]
        self.outer.units = layer_blocks(names)  # type: ignore[attr-defined]
        super().setup(trainer)
        if trainer.state.fn != TrainerFn.FITTING:  # validate/test: keep the communicators (and their counts)
            return
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            if self._outer_group is None:  # collective: every rank creates it at the same point
                self._outer_group = dist.new_group(timeout=self._timeout)
            self._outer_comm = TorchDistCommunicator(self._outer_group)
        else:
            self._outer_comm = SingleProcessCommunicator()

    def _counted_comms(self) -> list[Communicator]:
        return super()._counted_comms() + ([self._outer_comm] if self._outer_comm is not None else [])

    def _sync_round(self) -> None:
        assert self._params is not None and self._outer_comm is not None
        comm = self._outer_comm
        self.outer.diagnostics = self._log_due()  # type: ignore[attr-defined]  # norms and a decode: when logged
        stats = self.outer.sync(self._params, comm, self._step)
        issued = self.outer.last_issued_bytes  # type: ignore[attr-defined]
        launched = self.outer.last_launched  # type: ignore[attr-defined]
        if launched is not None and self._world > 1:
            before = comm.link_bytes_total
            self._launch_side(launched)
            issued += comm.link_bytes_total - before
        self._peak_step_bytes = max(self._peak_step_bytes, issued)
        if stats is None:
            return
        if self._side is not None:
            self._merge_side()
        self._rounds += 1
        if stats.skipped:
            self._skipped += 1
            self._warned = act_on_nonfinite(self.lightning_module.trainer, "StreamingDiLoCoStrategy",
                                            self.on_nonfinite, f"outer pseudo-gradient (fragment {stats.fragment})",
                                            warned=self._warned)
        self._maybe_log(stats)

    def _launch_side(self, fragment: int) -> None:
        """Start the all-reduce that travels with a launch: this rank's non-finite flag (steps dropped since the last
        launch) and, at the round's last fragment, the float buffers. It is waited for at the fragment's merge."""
        assert self._outer_comm is not None
        flag = torch.tensor([1.0 if self._nonfinite_pending else 0.0], device=self.root_device)
        self._nonfinite_pending = False
        last = fragment == self.outer.num_fragments - 1  # type: ignore[attr-defined]
        sent = flatten(self._buffers).to(self.root_device) if last and self.sync_buffers and self._buffers else None
        vec = flag if sent is None else torch.cat([flag, sent])
        self._side = (self._outer_comm.all_reduce_mean_async(vec), sent)

    def _merge_side(self) -> None:
        assert self._side is not None
        pending, sent = self._side
        self._side = None
        mean = pending.wait()
        if sent is not None:  # running statistics kept moving during the overlap: keep this rank's change since
            unflatten_into(mean[1:] + (flatten(self._buffers).to(mean.device) - sent), self._buffers)
        if float(mean[0]) > 0:  # some rank dropped a non-finite step before the launch
            later = self._nonfinite_pending  # one dropped since the launch is shared at the next launch
            self._act_on_nonfinite()
            self._nonfinite_pending = later

    @override
    def on_train_end(self) -> None:
        if self._side is not None:  # training ended with a fragment in flight: the final merge averages everything
            self._side[0].wait()
            self._side = None
        super().on_train_end()

    def _maybe_log(self, stats: Any) -> None:
        trainer = self.lightning_module.trainer
        due = self._log_due()
        super()._maybe_log(stats)  # the local-SGD keys
        if not due:
            return
        q = stats.quant_rel_error_sq if stats.quant_rel_error_sq is not None else torch.zeros(())
        q = q.float().reshape(1).to(self.root_device)
        self._aux.all_reduce_mean_(q)  # type: ignore[union-attr]  # logging only: one scalar
        log_metrics(trainer, "local_sgd", {
            "link_bytes_total": self.outer.link_bytes_total,  # type: ignore[attr-defined]
            "fragment_sync_bytes": stats.bytes_sent,
            "peak_step_bytes": self._peak_step_bytes,
            "sync_wait_ms": stats.wait_ms,
            "quantization_error": q[0].clamp_min(0).sqrt(),
        }, step=self._step)

    @override
    def rank_state_dict(self) -> dict[str, Any]:
        state = super().rank_state_dict()
        if not state.get("empty"):
            state["peak_step_bytes"] = self._peak_step_bytes
            side = None
            if self._side is not None:  # wait for it here (collective point), so the merge after resume is the same
                mean, sent = self._side[0].wait(), self._side[1]
                self._side = (done(mean), sent)
                side = {"mean": mean.clone(), "sent": None if sent is None else sent.clone()}
            state["side"] = side
        return state

    @override
    def load_rank_state_dict(self, state: dict[str, Any]) -> None:
        if not state.get("empty") and self._params is not None:
            device = self._params[0].device
            state = dict(state, outer=_to_device(state["outer"], device))
            self._peak_step_bytes = int(state["peak_step_bytes"])
            side = _to_device(state.get("side"), device)
            self._side = None if side is None else (done(side["mean"]), side["sent"])
        super().load_rank_state_dict(state)


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_device(v, device) for v in obj]
    return obj


def register_strategies() -> None:
    """Register ``streaming_diloco`` with Lightning's strategy registry."""
    from lightning_convergence.strategies import register_strategy

    register_strategy("streaming_diloco", StreamingDiLoCoStrategy,
                      "Streaming DiLoCo: 4 fragments, H=32, overlap 1 step, fp4 (E3M0) outer gradients",
                      num_fragments=4, sync_every=32, overlap_steps=1, mixing=0.5, eager=False,
                      quantization="fp4_e3m0")
