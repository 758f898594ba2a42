"""Streaming DiLoCo: P fragments synced on staggered schedules, each outer all-reduce overlapped with τ inner steps.

Imports torch only. Collectives go through a :class:`~lightning_convergence.comm.Communicator` (the strategy passes
``TorchDistCommunicator(group)`` on a dedicated group); the quantized mean is the communication layer's
:class:`~lightning_convergence.comm.quantized.QuantizedMean`, and link bytes are what the communicator counts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_convergence._checks import argument_error, check_choice, check_int, check_int_at_least, check_number
from lightning_convergence.averaging.base import STATE_VERSION, OuterStep, SyncStats, finite, sqn
from lightning_convergence.averaging.diloco import nesterov_outer_update
from lightning_convergence.comm import Communicator
from lightning_convergence.comm.quantized import QuantizedMean
from lightning_convergence.compress.blockquant import QUANT_FORMATS, BlockQuantizer

__all__ = ["StreamingDiLoCo", "StreamingStats", "fragment_due", "fragment_offsets", "partition_fragments"]

_PARTITIONS = ("strided", "contiguous")


# ---------------------------------------------------------------------------------------------------- schedule
def partition_fragments(unit_sizes: list[int], num_fragments: int, mode: str = "strided") -> list[list[int]]:
    """Split units (layer blocks, in model order) into ``num_fragments`` fragments; returns unit indices per fragment.

    ``"strided"`` (the paper's choice): unit ``u`` goes to fragment ``u mod P``. ``"contiguous"``: consecutive runs
    of about equal element count. Every unit lands in exactly one fragment, and no fragment is empty.

    Raises:
        ValueError: fewer units than fragments, or an unknown ``mode``.
    """
    check_choice("partition_fragments", "mode", mode, _PARTITIONS)
    if len(unit_sizes) < num_fragments:
        raise argument_error("StreamingDiLoCo", "num_fragments",
                             f"<= the number of layer blocks ({len(unit_sizes)})", num_fragments)
    if mode == "strided":
        return [list(range(p, len(unit_sizes), num_fragments)) for p in range(num_fragments)]
    total, out, acc = sum(unit_sizes), [[] for _ in range(num_fragments)], 0
    for u, size in enumerate(unit_sizes):
        p = min(int(acc * num_fragments // max(total, 1)), num_fragments - 1)
        p = max(p, num_fragments - (len(unit_sizes) - u))  # leave at least one unit for every later fragment
        p = min(p, u)  # and never skip a fragment
        out[p].append(u)
        acc += size
    return out


def fragment_offsets(sync_every: int, num_fragments: int) -> list[int]:
    """Step within each window of H steps at which fragment p launches its sync: ``⌊H·(p+1)/P⌋ mod H`` (torchft)."""
    return [(sync_every * (p + 1) // num_fragments) % sync_every for p in range(num_fragments)]


def fragment_due(step: int, sync_every: int, num_fragments: int) -> int | None:
    """The fragment whose outer sync launches right after optimizer step ``step`` (1-based), or ``None``."""
    if step <= 0:
        return None
    r = step % sync_every
    for p, off in enumerate(fragment_offsets(sync_every, num_fragments)):
        if off == r:
            return p
    return None


class _InFlight:
    """One fragment's outer mean in flight: the pending mean, and what the merge needs."""

    def __init__(self, fragment: int, launch_step: int, local_delta: Tensor, start: Tensor | None) -> None:
        self.fragment, self.launch_step = fragment, launch_step
        self.local_delta, self.start = local_delta, start
        self.pending: Any = None  # a PendingMean (fp32 all-reduce) or a QuantizedMean (two stages)
        self.mean: Tensor | None = None  # materialised result (after wait, or restored from a checkpoint)
        self.quant_error_sq: Tensor | None = torch.zeros(())  # None: not measured yet (``encoded`` can)
        self.encoded: QuantizedMean | None = None  # the quantized mean, kept for its own-error diagnostic
        self.link_bytes = 0  # what this rank's communicator counted for it so far


@dataclass
class StreamingStats(SyncStats):
    """:class:`SyncStats` plus what a fragment sync did: ``bytes_sent`` is the link bytes this rank's communicator
    counted for the fragment's mean; ``fragment`` the fragment merged; ``wait_ms`` the time blocked in the final wait
    (0 when the overlap hid the collective); ``quant_rel_error_sq`` ``‖Q(Δ_i)−Δ_i‖²/‖Δ_i‖²`` of this rank's own
    contribution (``None`` when the core's ``diagnostics`` was off, and then both norms are 0)."""

    fragment: int = 0
    wait_ms: float = 0.0
    quant_rel_error_sq: Tensor | None = None


class StreamingDiLoCo(OuterStep):
    """DiLoCo's outer Nesterov step applied per fragment, each fragment's all-reduce overlapped with τ inner steps.

    The model's layer blocks are split into ``num_fragments`` (P) fragments (:func:`partition_fragments`). Fragment p
    launches its sync after step t with ``t mod H = ⌊H(p+1)/P⌋ mod H`` (:func:`fragment_due`): ``Δ_i = θ_anchor,p −
    θ_i,p`` goes into an asynchronous mean (float32 ring all-reduce, or a quantized reduce-scatter + all-gather) and
    training continues. After step ``t+τ`` the mean Δ̄ is waited for, the fragment's anchor takes torch's Nesterov SGD
    step on it (``b ← μb + Δ̄; θ_anchor ← θ_anchor − lr·(Δ̄ + μb)``), and the replica's fragment is merged:
    ``θ_i,p ← (1−α)·θ_anchor,p + α·θ_i,p`` (α = ``mixing``). With ``eager=True`` the replica instead jumps at launch to
    the outer step taken with the proxy ``Δ̃_i = Δ_i/W + Σ_{j≠i} Δ_j^{prev}/W`` (its own fresh pseudo-gradient plus
    the others' from the fragment's previous round), trains τ steps from there, and on arrival keeps those τ steps of
    progress on top of the true new anchor: ``θ_i,p ← θ_anchor,p + (θ_i,p − θ̃_i,p)``. With P=1, τ=0, α=0 and no
    quantization this is :class:`~lightning_convergence.averaging.DiLoCo` exactly.

    Papers: Douillard, Donchev, Rush, Kale, Charles, Garrett, Teston, Lacey, McIlroy, Shen, Ramé, Szlam, Ranzato,
    Barham. *Streaming DiLoCo with overlapping communication: Towards a Distributed Free Lunch.* arXiv:2501.18512
    (2025); Kale, Douillard, Donchev. *Eager Updates For Overlapped Communication and Computation in DiLoCo.*
    arXiv:2502.12996 (2025). Schedule offsets and the ``lerp`` merge as in torchft's ``local_sgd.py``.

    Deviations: (1) the eager rule is our reconstruction from the eager paper's description (mix the current local
    outer gradient with the others' delayed ones, correct when the mean arrives); its first round uses ``Δ̃_i = Δ_i``.
    (2) τ < ⌊H/P⌋, so at most one fragment is in flight (torchft's constraint). (3) Quantized means are rounded twice
    (each rank's chunks, then the mean chunk), see :class:`~lightning_convergence.compress.BlockQuantizer`; at world
    size 1 nothing is sent or rounded. (4) A non-finite mean drops the fragment's round: the fragment returns to its
    anchor, momentum untouched. (5) :meth:`finalize` (end of training) merges what is in flight and then takes one
    blocking outer step per fragment with α=0, so every replica ends on the same model without a float32 average.

    Args:
        num_fragments: P ≥ 1, fragments of layer blocks. Default 4. Peak bytes per sync fall by P.
        sync_every: H ≥ P, inner steps between two syncs of the same fragment. Default 32.
        overlap_steps: τ in [0, ⌊H/P⌋), inner steps the all-reduce travels before it is merged ("tao" in torchft).
            Default 1. 0 blocks at the sync step.
        mixing: α in [0, 1], weight of the local fragment in the merge (torchft default 0; the paper reports 0.5).
            Default 0.5. Ignored with ``eager``.
        eager: eager updates (arXiv:2502.12996). Default ``False``.
        quantization: ``None`` (float32 all-reduce), ``"int8"``, ``"fp4_e2m1"`` or ``"fp4_e3m0"`` (paper). Default
            ``"fp4_e3m0"``.
        block_size: entries per quantization scale. Default 256.
        lr: outer learning rate (paper 0.7), > 0. momentum: μ in [0, 1) (0.9). nesterov: Nesterov (default) or
            heavy ball.
        partition: ``"strided"`` (paper, default) or ``"contiguous"`` layer blocks per fragment.

    State: per fragment ``anchor`` and ``momentum_buffer`` (float32), ``others_prev`` (eager, per rank), the fragment
    in flight with its mean materialised (see :meth:`state_dict`), ``link_bytes_total`` (this rank's communicator's
    count for the outer means), ``version``.

    Raises:
        ValueError: a hyperparameter outside its range (message names the field). TypeError: a value of the
            wrong type (a float where an int is meant, a string where a number is meant).

    Example:
        >>> outer = StreamingDiLoCo(num_fragments=2, sync_every=8, overlap_steps=1)
        >>> [fragment_due(s, 8, 2) for s in range(1, 9)]
        [None, None, None, 0, None, None, None, 1]
    """

    name = "streaming_diloco"

    def __init__(
        self, num_fragments: int = 4, sync_every: int = 32, overlap_steps: int = 1, mixing: float = 0.5,
        eager: bool = False, quantization: str | None = "fp4_e3m0", block_size: int = 256, lr: float = 0.7,
        momentum: float = 0.9, nesterov: bool = True, partition: str = "strided",
    ) -> None:
        owner = "StreamingDiLoCo"
        self.num_fragments = check_int_at_least(owner, "num_fragments", num_fragments, 1)
        self.sync_every = check_int_at_least(owner, "sync_every", sync_every, num_fragments)
        # overlap_steps < sync_every / num_fragments: a fragment's result lands before its next sync starts
        self.overlap_steps = check_int(owner, "overlap_steps", overlap_steps, 0, sync_every // num_fragments - 1)
        mixing = check_number(owner, "mixing", mixing, 0, 1)
        check_choice(owner, "quantization", quantization, (None, *QUANT_FORMATS))
        lr = check_number(owner, "lr", lr, 0, low_open=True)
        momentum = check_number(owner, "momentum", momentum, 0, 1, high_open=True)
        check_choice(owner, "partition", partition, _PARTITIONS)
        self.mixing, self.eager = mixing, bool(eager)
        self._due = {off: p for p, off in enumerate(fragment_offsets(sync_every, num_fragments))}
        self.quantizer = None if quantization is None else BlockQuantizer(quantization, block_size)
        self.quantization = quantization
        self.lr, self.momentum, self.nesterov, self.partition = float(lr), float(momentum), bool(nesterov), partition
        self.units: list[list[int]] | None = None  # layer blocks as parameter indices (set by the strategy)
        self.fragments: list[list[int]] = []
        self.anchors: list[Tensor] = []
        self.momentum_buffers: list[Tensor] = []
        self.others_prev: list[Tensor | None] = []
        self._inflight: _InFlight | None = None
        self._comm: Communicator | None = None  # of the last call (a pending stage is finished with it on save)
        self.last_issued_bytes = 0  # link bytes this rank issued at the last step (peak-per-step diagnostics)
        self.last_launched: int | None = None  # the fragment launched at the last step, if any
        #: compute the diagnostics of the fragment merged next (pseudo-gradient and divergence norms, quantization
        #: error: a decode of this rank's payload); off, its stats carry zeros and ``quant_rel_error_sq=None``. The
        #: strategy turns it on for logging steps only, keeping merges cheap
        self.diagnostics = True
        self.link_bytes_total = 0  # link bytes this rank has sent (final merge included)

    # -------------------------------------------------------------------------------------------- set-up
    def init_state(self, params: list[Tensor]) -> None:
        units = self.units if self.units is not None else [[i] for i in range(len(params))]
        sizes = [sum(params[i].numel() for i in u) for u in units]
        per_fragment = partition_fragments(sizes, self.num_fragments, self.partition)
        self.fragments = [sorted(i for u in frag for i in units[u]) for frag in per_fragment]
        covered = sorted(i for frag in self.fragments for i in frag)
        if covered != list(range(len(params))):
            raise ValueError("StreamingDiLoCo: `units` must cover every parameter exactly once.")
        self.anchors = [self._flat(params, p) for p in range(self.num_fragments)]
        self.momentum_buffers = [torch.zeros_like(a) for a in self.anchors]
        self.others_prev = [None] * self.num_fragments
        self._inflight = None

    def _flat(self, params: list[Tensor], p: int) -> Tensor:
        return torch.cat([params[i].detach().reshape(-1).float() for i in self.fragments[p]])

    def _write(self, flat: Tensor, params: list[Tensor], p: int) -> None:
        torch._foreach_copy_([params[i].data for i in self.fragments[p]],
                             [c.view_as(params[i]) for i, c in zip(self.fragments[p], flat.split(
                                 [params[i].numel() for i in self.fragments[p]]))])

    # -------------------------------------------------------------------------------------------- per step
    def sync(self, params: list[Tensor], comm: Communicator, step: int) -> StreamingStats | None:  # type: ignore[override]
        """Advance the pipeline after optimizer step ``step``: finish, forward or launch what the schedule says.

        Returns the stats of a fragment merged at this step, else ``None``. Cheap (integer compares) on steps where
        nothing is due.
        """
        out = None
        self._comm = comm
        self.last_issued_bytes = 0
        self.last_launched = None
        fl = self._inflight
        if fl is not None:
            age = step - fl.launch_step
            if age == self.overlap_steps // 2:
                self._stage_two(fl, comm)
            if age == self.overlap_steps:
                out = self._complete(params, comm)
        p = self._due.get(step % self.sync_every) if step > 0 else None  # fragment_due, one dict look-up
        if p is not None:
            self.last_launched = p
            self._launch(params, comm, step, p)
            if self.overlap_steps == 0:
                out = self._complete(params, comm)
        return out

    def _launch(self, params: list[Tensor], comm: Communicator, step: int, p: int, final: bool = False) -> int:
        anchor, buf = self.anchors[p], self.momentum_buffers[p]
        delta = anchor - self._flat(params, p)
        start = None
        if self.eager and not final:
            w = comm.world_size
            prev = self.others_prev[p]
            proxy = delta / w + prev if prev is not None else delta
            b = buf * self.momentum + proxy
            start = anchor - self.lr * (proxy + self.momentum * b if self.nesterov else b)
            self._write(start, params, p)
        quantized = self.quantizer is not None and comm.world_size > 1
        fl = _InFlight(p, step, delta if quantized else delta.clone(), start)  # the quantized mean only reads it
        self._inflight = fl
        before = comm.link_bytes_total
        if not quantized:
            fl.pending = comm.all_reduce_mean_async(delta)  # delta is owned by the collective from here on
        else:
            fl.pending = fl.encoded = QuantizedMean(delta, comm, self.quantizer)
            fl.quant_error_sq = None  # measured at the merge, if asked (``diagnostics``)
        self._count(fl, comm.link_bytes_total - before)
        if self.overlap_steps // 2 == 0:
            self._stage_two(fl, comm)
        return self.last_issued_bytes

    def _count(self, fl: _InFlight, sent: int) -> None:
        fl.link_bytes += sent
        self.link_bytes_total += sent
        self.last_issued_bytes += sent

    def _stage_two(self, fl: _InFlight, comm: Communicator) -> None:
        """Quantized path: reduce this rank's chunk and start the all-gather of the mean chunk (no-op otherwise)."""
        if isinstance(fl.pending, QuantizedMean):
            before = comm.link_bytes_total
            fl.pending.forward()
            self._count(fl, comm.link_bytes_total - before)

    def _wait_mean(self, fl: _InFlight, comm: Communicator) -> Tensor:
        if fl.mean is None:
            self._stage_two(fl, comm)
            fl.mean = fl.pending.wait()
            fl.pending = None
        return fl.mean

    def _complete(self, params: list[Tensor], comm: Communicator, final: bool = False) -> StreamingStats:
        fl = self._inflight
        assert fl is not None
        self._inflight = None
        p, w = fl.fragment, comm.world_size
        t0 = time.perf_counter()
        mean = self._wait_mean(fl, comm)
        wait_ms = (time.perf_counter() - t0) * 1e3
        diag = self.diagnostics
        divergence_sq = sqn(fl.local_delta - mean) if diag else torch.zeros(())
        common = dict(fragment=p, wait_ms=wait_ms, quant_rel_error_sq=self._quant_error(fl) if diag else None)
        if not finite(mean):
            self._write(self.anchors[p], params, p)
            return StreamingStats(fl.link_bytes, torch.zeros(()), divergence_sq, skipped=True, **common)
        anchor = self.anchors[p]
        nesterov_outer_update(anchor, self.momentum_buffers[p], mean, self.lr, self.momentum, self.nesterov)
        if final:
            new = anchor
        elif self.eager:
            assert fl.start is not None
            new = anchor + (self._flat(params, p) - fl.start)
            self.others_prev[p] = mean - fl.local_delta / w
        elif self.mixing == 0.0:
            new = anchor
        else:
            new = torch.lerp(anchor, self._flat(params, p), self.mixing)
        self._write(new, params, p)
        return StreamingStats(fl.link_bytes, sqn(mean) if diag else torch.zeros(()), divergence_sq, **common)

    @staticmethod
    def _quant_error(fl: _InFlight) -> Tensor:
        """``‖Q(Δ_i)−Δ_i‖²/‖Δ_i‖²`` of this rank's contribution to ``fl`` (0 unquantized), measured once."""
        if fl.quant_error_sq is None:
            assert fl.encoded is not None
            fl.quant_error_sq = fl.encoded.own_error_sq() / sqn(fl.local_delta).clamp_min(1e-30)
        return fl.quant_error_sq

    def drain(self, params: list[Tensor], comm: Communicator | None = None) -> StreamingStats | None:
        """Merge the fragment still in flight now (its stats), or ``None`` when nothing is in flight."""
        if self._inflight is None:
            return None
        return self._complete(params, self._comm if self._comm is not None else comm)

    def finalize(self, params: list[Tensor], comm: Communicator) -> StreamingStats | None:
        """End of training: merge the fragment in flight, then one last blocking outer step of every fragment (with
        the same quantization) that lands every replica on the new anchors, so all ranks end on one model.

        Returns the summed stats, or ``None`` if no step ever ran (the replicas are still identical)."""
        comm = self._comm if self._comm is not None else comm
        if self._comm is None:
            return None
        done = [s for s in [self.drain(params, comm)] if s is not None]
        for p in range(self.num_fragments):
            self._launch(params, comm, -1, p, final=True)
            done.append(self._complete(params, comm, final=True))
        return StreamingStats(
            sum(s.bytes_sent for s in done), sum(s.pseudo_grad_sq for s in done), sum(s.divergence_sq for s in done),
            skipped=any(s.skipped for s in done), fragment=self.num_fragments - 1,
            wait_ms=sum(s.wait_ms for s in done), quant_rel_error_sq=None)

    # -------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything training changed. A fragment in flight is **completed here** (its mean waited for and stored),
        so a resume continues bit-exactly: the merge happens at the scheduled step with the same mean. All ranks
        call this at the same step (checkpointing is collective), so a pending second stage is issued in step."""
        fl = self._inflight
        inflight = None
        if fl is not None:
            mean = self._wait_mean(fl, self._comm)
            inflight = {"fragment": fl.fragment, "launch_step": fl.launch_step, "mean": mean.clone(),
                        "local_delta": fl.local_delta.clone(), "quant_error_sq": self._quant_error(fl).clone(),
                        "link_bytes": fl.link_bytes,
                        "start": None if fl.start is None else fl.start.clone()}
        return {
            "version": STATE_VERSION,
            "anchors": [a.clone() for a in self.anchors],
            "momentum_buffers": [b.clone() for b in self.momentum_buffers],
            "others_prev": [None if o is None else o.clone() for o in self.others_prev],
            "inflight": inflight,
            "link_bytes_total": self.link_bytes_total,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_version(state)
        if len(state["anchors"]) != self.num_fragments:
            raise RuntimeError(f"StreamingDiLoCo: checkpoint has {len(state['anchors'])} fragments, but "
                               f"`num_fragments` is {self.num_fragments}.")
        self.anchors = [a.clone() for a in state["anchors"]]
        self.momentum_buffers = [b.clone() for b in state["momentum_buffers"]]
        self.others_prev = [None if o is None else o.clone() for o in state["others_prev"]]
        self.link_bytes_total = int(state["link_bytes_total"])
        s = state["inflight"]
        self._inflight = None
        if s is not None:
            fl = _InFlight(int(s["fragment"]), int(s["launch_step"]), s["local_delta"].clone(),
                           None if s["start"] is None else s["start"].clone())
            fl.mean, fl.quant_error_sq = s["mean"].clone(), s["quant_error_sq"].clone()
            fl.link_bytes = int(s["link_bytes"])
            self._inflight = fl
