"""``LocalSGDStrategy``: every rank trains H steps on its own, then the replicas meet through a pluggable outer step.

The adapter holds no math (outer steps and schedules live in :mod:`lightning_convergence.averaging`) and talks to
other ranks only through :mod:`lightning_convergence.comm`. The module is **not** wrapped in
``DistributedDataParallel``: the local phase never all-reduces gradients; a DDP warm-up (``schedule.start_step``)
averages them in ``post_backward`` (one flat buffer). Initial parameters and buffers are broadcast from rank 0.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_convergence._checks import argument_error, check_choice, check_instance, check_state_version
from lightning_convergence._metrics import log_metrics
from lightning_convergence._nonfinite import act_on_nonfinite, check_nonfinite_policy
from lightning_convergence._rank_state import PerRankStateMixin
from lightning_convergence.averaging import make_outer_step
from lightning_convergence.averaging.base import (
    Communicator,
    OuterStep,
    SyncStats,
    TorchDistCommunicator,
    flatten,
    float_state_tensors,
    unflatten_into,
)
from lightning_convergence.averaging.schedules import FixedPeriod, SyncSchedule
from lightning_convergence.comm import SingleProcessCommunicator
from lightning_convergence.stats.norms import all_finite

__all__ = ["LocalSGDStrategy", "register_strategies"]

_OPTIMIZER_STATE = ("keep", "average", "reset")
_REJECTED_KWARGS = ("ddp_comm_hook", "ddp_comm_state", "ddp_comm_wrapper", "model_averaging_period")
STATE_VERSION = 1


class LocalSGDStrategy(PerRankStateMixin, DDPStrategy):
    """Local SGD on Lightning: H local optimizer steps per rank, then an outer step (average, DiLoCo, NoLoCo, CO2).

    Papers: Stich, *Local SGD Converges Fast and Communicates Little*, ICLR 2019, arXiv:1805.09767; Lin, Stich,
    Patel, Jaggi, *Don't Use Large Mini-Batches, Use Local SGD*, ICLR 2020, arXiv:1808.07217 (post-local SGD);
    Douillard et al., *DiLoCo*, arXiv:2311.08105; Kolehmainen et al., *NoLoCo*, arXiv:2506.10911; Sun et al., *CO2*,
    ICLR 2024, arXiv:2401.16265; *A Single Merging Suffices* (2025) for the late-merging schedules.

    Each rank trains on its own shard; after the steps where ``schedule.should_sync(step)`` holds, the ``outer`` step
    mixes the replicas. Validation and checkpoints' ``state_dict`` see the mean of the replicas; each rank's own
    replica and state go into the checkpoint per rank. At the end of ``fit`` the replicas are merged (plain mean; CO2
    first applies what is in flight) unless ``final_merge=False``. See ``docs/algorithms/local_sgd.md``.

    Deviations: no ``DistributedDataParallel`` wrapper; the DDP warm-up all-reduces gradients after each backward
    (one flat buffer, no overlap); buffers are averaged once when the warm-up ends, not broadcast at every forward.
    The final merge is a plain average. Logging's two-scalar all-reduce and validation's averaging are not training
    traffic and are not counted in ``bytes_sent_total``.

    Args:
        outer: the outer step: ``"average"`` (:class:`~lightning_convergence.averaging.PeriodicAveraging`),
            ``"diloco"``, ``"noloco"``, ``"co2"`` (defaults of each class), a dotted path to an ``OuterStep``
            subclass, or an instance (``class_path`` in YAML). Default ``"average"``.
        schedule: an int H (:class:`~lightning_convergence.averaging.FixedPeriod` with that period) or a
            :class:`~lightning_convergence.averaging.SyncSchedule` (``FixedPeriod(period, start_step)`` for post-local
            SGD, ``IncreasingFrequency``, ``SingleFinalMerge``). Default 8.
        sync_buffers: average floating-point buffers (BatchNorm running statistics) at every sync with the same
            pattern as the parameters (NoLoCo: with the partner). Default ``True``. Integer buffers are left alone.
        optimizer_state: what happens to the inner optimizer's state at a sync: ``"keep"`` (default; DiLoCo and NoLoCo
            keep it), ``"average"`` (floating-point state tensors such as Adam moments are averaged like the
            parameters; ``step`` counters are left alone) or ``"reset"`` (cleared).
        final_merge: merge the replicas at the end of ``fit``. Default ``True``.
        average_for_eval: validate on the mean of the replicas. Default ``True``; ``False`` validates each rank's
            own replica (Lightning then reduces the metrics across ranks).
        on_nonfinite: ``"stop"`` (default) or ``"skip"``, the shared policy of ``lightning_convergence._nonfinite``:
            a backward that leaves a non-finite gradient has that optimizer step dropped on its rank (gradients set
            to ``None``, so nothing enters the replica, the optimizer state or the outer step), counted once per step
            in ``nonfinite_skipped_total``. ``"stop"`` then ends training for all ranks together: at once on one
            process, at the next sync round otherwise (the finding rides on that round's collective).
        **kwargs: passed to :class:`~lightning.pytorch.strategies.DDPStrategy` (``start_method``, ``timeout``,
            ``process_group_backend``...). DDP communication hooks are rejected.

    State (per rank): ``step``, ``sync_rounds_total``, ``bytes_sent_total``, ``nonfinite_skipped_total``, the outer
    step's ``state_dict``, this rank's parameters and float buffers (flat), the inner optimizer's ``state_dict``,
    ``version``.

    Logs: ``convergence/local_sgd/sync_rounds_total``, ``convergence/local_sgd/bytes_sent_total`` (link bytes this
    rank sent for training, as its communicator counted them: ring all-reduce ``2(W−1)/W·n``, point-to-point ``n``;
    warm-up gradient all-reduces and the non-finite flag included), ``convergence/local_sgd/pseudo_grad_norm``,
    ``convergence/local_sgd/replica_divergence`` (root mean over ranks of ``||θ_i − θ̄||²`` before mixing, θ̄ the mean
    the round averages over: all ranks, or the NoLoCo pair), ``convergence/local_sgd/nonfinite_skipped_total``; at
    sync rounds, at most every ``log_every_n_steps``.

    Raises:
        ValueError: unknown ``outer`` or ``optimizer_state``; a DDP comm hook or ``model_averaging_period`` given.
        TypeError: ``outer`` or ``schedule`` of the wrong type.
        RuntimeError: more than one optimizer (at setup).

    Example:
        >>> from lightning_convergence.averaging import DiLoCo, FixedPeriod
        >>> strategy = LocalSGDStrategy(outer=DiLoCo(lr=0.7, momentum=0.9), schedule=FixedPeriod(period=32))
        >>> # Trainer(accelerator="cpu", devices=2, strategy=strategy)   or   Trainer(strategy="diloco")
    """

    rank_state_key = "convergence/local_sgd"

    def __init__(
        self,
        outer: str | OuterStep = "average",
        schedule: int | SyncSchedule = 8,
        sync_buffers: bool = True,
        optimizer_state: str = "keep",
        final_merge: bool = True,
        average_for_eval: bool = True,
        on_nonfinite: str = "stop",
        **kwargs: Any,
    ) -> None:
        self.on_nonfinite = check_nonfinite_policy("LocalSGDStrategy", on_nonfinite)
        self._bad_step = False  # this optimizer step saw a non-finite gradient on this rank
        self._nonfinite_pending = False  # a finding not yet shared with the other ranks
        self._nonfinite_warned = False
        for key in _REJECTED_KWARGS:
            if kwargs.get(key) is not None:
                raise argument_error("LocalSGDStrategy", key, "None (there is no DDP reducer: the local phase sends "
                                     "no gradients)", kwargs[key], hint="Use `schedule` and `outer` instead.")
        self.outer = make_outer_step(outer)
        if isinstance(schedule, bool):
            raise argument_error("LocalSGDStrategy", "schedule", "an int or a SyncSchedule", schedule, TypeError)
        check_instance("LocalSGDStrategy", "schedule", schedule, (int, SyncSchedule), "an int or a SyncSchedule")
        self.schedule = FixedPeriod(period=schedule) if isinstance(schedule, int) else schedule
        check_choice("LocalSGDStrategy", "optimizer_state", optimizer_state, _OPTIMIZER_STATE)
        super().__init__(**kwargs)
        self.sync_buffers = bool(sync_buffers)
        self.optimizer_state_mode = optimizer_state
        self.final_merge = bool(final_merge)
        self.average_for_eval = bool(average_for_eval)
        self._params: list[Tensor] | None = None
        self._buffers: list[Tensor] = []
        self._comm: Communicator | None = None  # training collectives: its count is `bytes_sent_total`
        self._aux: Communicator | None = None  # not training traffic: initial broadcast, eval/checkpoint means, logs
        self._eval_backup: tuple[Tensor, Tensor] | None = None
        self._in_sync = True  # replicas known to be identical (no averaging needed for eval/checkpoints)
        self._step = 0
        self._rounds = 0
        self._bytes_base = 0  # bytes counted before a resume (the communicators restart from 0)
        self._skipped = 0
        self._last_log_step = -math.inf

    # ------------------------------------------------------------------ wiring
    # Private Lightning API (``DDPStrategy.configure_ddp`` calls both): no DDP wrapper and no comm hook, so the local
    # phase never all-reduces gradients. tests/strategies/test_local_sgd_state.py pins the names and the caller.
    @override
    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:  # type: ignore[override]
        return model

    @override
    def _register_ddp_hooks(self) -> None:
        return None

    @override
    def setup(self, trainer: Any) -> None:
        super().setup(trainer)
        if trainer.state.fn != TrainerFn.FITTING:
            return
        if len(self.optimizers) != 1:
            raise RuntimeError(f"LocalSGDStrategy: needs exactly one optimizer, got {len(self.optimizers)}.")
        module = self.lightning_module
        distributed = dist.is_available() and dist.is_initialized()
        self._bytes_base = self.bytes_sent_total()  # a later fit() gets fresh communicators: keep the count
        self._comm = TorchDistCommunicator() if distributed else SingleProcessCommunicator()
        self._aux = TorchDistCommunicator() if distributed else SingleProcessCommunicator()
        self._aux.broadcast_flat_([t.data for t in list(module.parameters()) + list(module.buffers())], root=0)
        self._params = list(module.parameters())
        self._buffers = [b for b in module.buffers() if b.is_floating_point()]
        self.outer.init_state(self._params)
        self._in_sync = True
        if self._comm.world_size == 1:
            rank_zero_warn(
                "LocalSGDStrategy: one process: there are no other replicas to average, so sync rounds only apply "
                f"the outer step ({type(self.outer).__name__}) to this replica's own progress. Train on 2 or more "
                "devices (or nodes) for local SGD."
            )

    @override
    def on_train_start(self) -> None:
        super().on_train_start()
        self.apply_pending_rank_state()

    @property
    def _world(self) -> int:
        return 1 if self._comm is None else self._comm.world_size

    # ------------------------------------------------------------------ training
    def _counted_comms(self) -> list[Communicator]:
        """The communicators whose link bytes are training traffic (``bytes_sent_total``)."""
        return [self._comm] if self._comm is not None else []

    def bytes_sent_total(self) -> int:
        """Link bytes this rank has sent for training, as its communicators counted them (resumes included)."""
        return self._bytes_base + sum(c.link_bytes_total for c in self._counted_comms())

    @override
    def post_backward(self, closure_loss: Tensor) -> None:
        super().post_backward(closure_loss)
        if self._params is None:
            return
        if self._world > 1 and self.schedule.in_warmup(self._step):
            # DDP warm-up: every rank joins the mean before the guard, so a non-finite gradient on any rank makes the
            # mean non-finite on all of them and every rank drops the step (a rank dropping its gradients alone would
            # leave the others waiting in the all-reduce).
            self._comm.all_reduce_mean_flat_([p.grad for p in self._params if p.grad is not None])  # type: ignore
        self._guard_nonfinite()

    @override
    def optimizer_step(
        self, optimizer: Optimizer, closure: Any, model: Any = None, **kwargs: Any
    ) -> Any:
        out = super().optimizer_step(optimizer, closure, model, **kwargs)
        if self._params is None:
            return out
        if self._bad_step:  # dropped: counted once per optimizer step
            self._bad_step = False
            self._skipped += 1
            self._nonfinite_pending = True
            if self._world == 1:
                self._act_on_nonfinite()
        self._step += 1
        if self.schedule.in_warmup(self._step - 1):  # that was a DDP step: replicas stay identical
            if not self.schedule.in_warmup(self._step):  # the local phase starts from here
                if self.sync_buffers:  # no DDP buffer broadcast ran during the warm-up
                    self._comm.all_reduce_mean_flat_(self._buffers)  # type: ignore[union-attr]
                self.outer.init_state(self._params)
            return out
        self._in_sync = False
        if self.schedule.should_sync(self._step):
            self._sync_round()
        return out

    def _guard_nonfinite(self) -> None:
        """Drop this micro-batch's gradients (and the rest of the step's) once any of them is non-finite."""
        assert self._params is not None
        grads = [p.grad for p in self._params if p.grad is not None]
        if not self._bad_step and (not grads or all_finite(grads)):
            return
        self._bad_step = True
        for p in self._params:
            p.grad = None

    def _act_on_nonfinite(self) -> None:
        trainer = self.lightning_module.trainer
        self._nonfinite_warned = act_on_nonfinite(trainer, "LocalSGDStrategy", self.on_nonfinite, "gradients",
                                                  warned=self._nonfinite_warned)
        self._nonfinite_pending = False

    def _share_nonfinite(self) -> None:
        """At a sync round: did any rank drop a non-finite step since the last round? (one 4-byte all-reduce)."""
        assert self._comm is not None
        flag = torch.tensor([1.0 if self._nonfinite_pending else 0.0], device=self.root_device)
        self._comm.all_reduce_mean_(flag)
        if float(flag) > 0:
            self._act_on_nonfinite()

    def _sync_round(self) -> None:
        assert self._params is not None and self._comm is not None
        if self._world > 1:
            self._share_nonfinite()
        stats = self.outer.sync(self._params, self._comm, self._step)
        self._mix_extras()
        self._rounds += 1
        self._skipped += int(stats.skipped)
        self._in_sync = self.outer.leaves_replicas_identical
        self._maybe_log(stats)

    def _mix_extras(self) -> None:
        """Average float buffers and (optionally) optimizer state like the parameters; reset state if asked."""
        assert self._comm is not None
        if self.sync_buffers and self._buffers:
            self.outer.average_(self._buffers, self._comm, self._step)
        if self.optimizer_state_mode == "average":
            self.outer.average_(float_state_tensors(self.optimizers[0]), self._comm, self._step)
        elif self.optimizer_state_mode == "reset":
            self.optimizers[0].state.clear()

    def _log_due(self) -> bool:
        """Whether a sync at this step is logged (``log_every_n_steps`` since the last logged one)."""
        every = max(int(getattr(self.lightning_module.trainer, "log_every_n_steps", 50) or 1), 1)
        return self._step - self._last_log_step >= every

    def _maybe_log(self, stats: SyncStats) -> None:
        trainer = self.lightning_module.trainer
        if not self._log_due():
            return
        self._last_log_step = self._step
        vals = torch.stack([stats.pseudo_grad_sq.float().cpu(), stats.divergence_sq.float().cpu()])
        vals = vals.to(self.root_device)
        self._aux.all_reduce_mean_(vals)  # type: ignore[union-attr]  # logging only: two scalars
        log_metrics(trainer, "local_sgd", {
            "sync_rounds_total": self._rounds,
            "bytes_sent_total": self.bytes_sent_total(),
            "pseudo_grad_norm": vals[0].clamp_min(0).sqrt(),
            "replica_divergence": vals[1].clamp_min(0).sqrt(),
            "nonfinite_skipped_total": self._skipped,
        }, step=self._step)

    @override
    def on_train_end(self) -> None:
        super().on_train_end()
        if self._params is None or not self.final_merge:
            return
        assert self._comm is not None
        stats = self.outer.finalize(self._params, self._comm)
        if stats is not None:  # the outer step drained itself: parameters are identical, buffers may not be
            self._rounds += 1
            self._comm.all_reduce_mean_flat_(self._buffers)
        elif not self._in_sync:
            self._rounds += 1
            self._comm.all_reduce_mean_flat_(self._params)
            self._comm.all_reduce_mean_flat_(self._buffers)
        self._in_sync = True
        self.outer.init_state(self._params)  # a later fit() continues from the merged model

    # ------------------------------------------------------------------ evaluation and checkpoints
    def _needs_average(self) -> bool:
        return self._params is not None and self._world > 1 and not self._in_sync

    @override
    def on_validation_start(self) -> None:
        super().on_validation_start()
        if self.average_for_eval and self._needs_average() and self._eval_backup is None:
            assert self._params is not None
            self._eval_backup = (flatten(self._params, dtype=None), flatten(self._buffers, dtype=None))
            self._aux.all_reduce_mean_flat_(self._params)  # type: ignore[union-attr]
            self._aux.all_reduce_mean_flat_(self._buffers)  # type: ignore[union-attr]

    @override
    def on_validation_end(self) -> None:
        super().on_validation_end()
        if self._eval_backup is not None:
            assert self._params is not None
            params, buffers = self._eval_backup
            self._eval_backup = None
            unflatten_into(params, self._params)
            unflatten_into(buffers, self._buffers)

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The module's state with parameters and float buffers replaced by their mean over ranks (collective)."""
        state = super().lightning_module_state_dict()
        if not self._needs_average() or self._eval_backup is not None:
            return state  # already identical (or the mean is swapped in for validation)
        module = self.lightning_module
        named = [(k, v) for k, v in list(module.named_parameters()) + list(module.named_buffers())
                 if k in state and v.is_floating_point()]
        tensors = [v.detach().clone() for _, v in named]
        self._aux.all_reduce_mean_flat_(tensors)  # type: ignore[union-attr]
        return {**state, **{k: t for (k, _), t in zip(named, tensors)}}

    def rank_state_dict(self) -> dict[str, Any]:
        if self._params is None:
            return {"version": STATE_VERSION, "empty": True}
        if self._eval_backup is not None:
            params, buffers = self._eval_backup
        else:
            params, buffers = flatten(self._params, dtype=None), flatten(self._buffers, dtype=None)
        return {"version": STATE_VERSION, "step": self._step, "sync_rounds_total": self._rounds,
                "bytes_sent_total": self.bytes_sent_total(), "nonfinite_skipped_total": self._skipped,
                "in_sync": self._in_sync, "outer": self.outer.state_dict(), "params": params.clone(),
                "buffers": buffers.clone(), "optimizer": self.optimizers[0].state_dict()}

    def load_rank_state_dict(self, state: dict[str, Any]) -> None:
        check_state_version("LocalSGDStrategy", state, STATE_VERSION)
        if state.get("empty") or self._params is None:
            return
        self._step = int(state["step"])
        self._rounds = int(state["sync_rounds_total"])
        self._bytes_base = int(state["bytes_sent_total"]) - sum(c.link_bytes_total for c in self._counted_comms())
        self._skipped = int(state["nonfinite_skipped_total"])
        self._in_sync = bool(state["in_sync"])
        device = self._params[0].device if self._params else self.root_device  # checkpoints hold CPU tensors
        self.outer.load_state_dict({k: v.to(device) if torch.is_tensor(v) else v for k, v in state["outer"].items()})
        unflatten_into(state["params"].to(self.root_device), self._params)
        unflatten_into(state["buffers"].to(self.root_device), self._buffers)
        self.optimizers[0].load_state_dict(state["optimizer"])


def register_strategies() -> None:
    """Register ``local_sgd``, ``diloco``, ``noloco`` and ``co2`` with Lightning's strategy registry."""
    from lightning_convergence.strategies import register_strategy

    register_strategy("local_sgd", LocalSGDStrategy, "Local SGD: average replicas every 8 steps",
                      outer="average", schedule=8)
    register_strategy("diloco", LocalSGDStrategy, "DiLoCo: outer Nesterov SGD (lr 0.7, momentum 0.9) every 32 steps",
                      outer="diloco", schedule=32)
    register_strategy("noloco", LocalSGDStrategy, "NoLoCo: random-pair outer heavy-ball step every 32 steps, no "
                      "all-reduce", outer="noloco", schedule=32)
    register_strategy("co2", LocalSGDStrategy, "CO2: overlapped one-round-stale outer momentum every 32 steps",
                      outer="co2", schedule=32)
