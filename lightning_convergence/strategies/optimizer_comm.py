"""``OptimizerCommStrategy``: DDP that stands aside while the optimizer (DeMo, 1-bit Adam) communicates itself.

The adapter holds no math. Its comm hook all-reduces gradients only on steps where the optimizer does not own the
communication (1-bit Adam's warm-up) and otherwise returns the local gradients untouched: no DDP all-reduce runs on
those steps. It hands the optimizer its collectives, saves every rank's optimizer state, counts link bytes and logs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import StrategyRegistry
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override

from lightning_convergence._checks import check_choice, check_int, check_state_version
from lightning_convergence._metrics import log_metrics, should_log
from lightning_convergence._nonfinite import act_on_nonfinite, check_nonfinite_policy
from lightning_convergence.comm import Communicator, SingleProcessCommunicator, TorchDistCommunicator, ddp_link_bytes
from lightning_convergence.strategies._ddp_base import HookedDDPStrategy

__all__ = ["OptimizerCommStrategy", "OptimizerCommHookState", "optimizer_comm_hook", "register_strategies"]

STATE_VERSION = 1
METHODS = {"demo": "DeMo", "onebit_adam": "OnebitAdam"}


class OptimizerCommHookState:
    """What the hook needs: a way to ask the optimizer whether it communicates this step, its own communicator for
    DDP's all-reduces (which counts their link bytes), and call counters."""

    def __init__(self, strategy: OptimizerCommStrategy) -> None:
        self.strategy = strategy
        self.comm: Communicator = TorchDistCommunicator() if dist.is_initialized() else SingleProcessCommunicator()
        self.world_size = self.comm.world_size
        self.counters = {"ddp_link_bytes_total": 0, "ddp_allreduce_calls_total": 0, "local_calls_total": 0}


def optimizer_comm_hook(state: OptimizerCommHookState, bucket):
    """DDP comm hook: average the bucket (one all-reduce) unless the optimizer owns this step's communication.

    ``(state, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]``; annotations left off (DDP compares them
    with the real classes and this module uses postponed annotations).
    """
    buffer = bucket.buffer()
    if state.strategy.optimizer_owns_step():
        state.counters["local_calls_total"] += 1
        fut: torch.futures.Future = torch.futures.Future()
        fut.set_result(buffer)
        return fut
    state.counters["ddp_allreduce_calls_total"] += 1
    before = state.comm.link_bytes_total
    buffer.div_(state.world_size)
    fut = state.comm.all_reduce_sum_async(buffer)
    state.counters["ddp_link_bytes_total"] += state.comm.link_bytes_total - before
    return fut


class OptimizerCommStrategy(HookedDDPStrategy):
    """DDP for optimizers that own their communication: DeMo and 1-bit Adam, on CPU/gloo or CUDA/NCCL.

    Paper: Peng, Quesnelle, Kingma et al. *DeMo: Decoupled Momentum Optimization.* arXiv:2411.19870 (ICLR 2026);
    Tang et al. *1-bit Adam: Communication Efficient Large-Scale Training with Adam's Convergence Speed.* ICML 2021,
    arXiv:2102.02888. The math lives in :class:`~lightning_convergence.optim.DeMo` and
    :class:`~lightning_convergence.optim.OnebitAdam`; select one as the optimizer (``optimizer:`` in YAML).

    Gradient clipping (``gradient_clip_val``) acts on each rank's *local* gradient whenever the optimizer owns the
    step (DeMo always; 1-bit Adam after ``start_step``), on the averaged one otherwise. Accumulation works as with
    DDP (the hook runs on the last micro-batch only).

    Deviations: with ``on_nonfinite="stop"`` a non-finite step is never applied (the optimizers drop it on every rank
    without a host sync), but the stop itself is decided when the counter is read, every ``log_every_n_steps`` steps.

    Args:
        method: the optimizer the strategy expects: ``"demo"``, ``"onebit_adam"`` or ``None`` (any optimizer with
            ``attach``/``owns_communication``). Default ``None``.
        log_every_n_steps: log (and read the non-finite counter) every this many optimizer steps, ≥ 1. Default ``None``:
            the trainer's ``log_every_n_steps``.
        on_nonfinite: ``"stop"`` or ``"skip"`` (see :mod:`lightning_convergence._nonfinite`). Default ``"stop"``.
        **kwargs: ``bucket_cap_mb``, Lightning's ``DDPStrategy`` arguments and further ``DistributedDataParallel``
            arguments (not ``ddp_comm_*``), see :class:`~lightning_convergence.strategies._ddp_base.HookedDDPStrategy`.

    State: under ``convergence/optimizer_comm`` every rank's full optimizer ``state_dict`` (momenta and error
    buffers differ per rank) and the hook's counters, with ``version``; each rank loads its own slice over the rank-0
    optimizer state Lightning restores.

    Logs: ``convergence/compress/link_bytes_per_rank_total`` (optimizer collectives + DDP all-reduces, link bytes
    one rank sent), ``convergence/compress/ratio`` (DDP's ring all-reduce bytes for the same steps / ours),
    ``convergence/compress/nonfinite_skipped_total``.

    Raises:
        ValueError: for an unknown ``method``, ``log_every_n_steps`` < 1, a bad ``on_nonfinite`` or a ``ddp_comm_*``
            argument. TypeError: a non-int ``log_every_n_steps``.
        RuntimeError: at setup, if the module has no or several optimizers, uses manual optimization, or its
            optimizer cannot own communication (or is not the ``method`` named).

    Example::

        Trainer(accelerator="cpu", devices=2, strategy=OptimizerCommStrategy(method="demo"))  # optimizer: DeMo
    """

    rank_state_key = "convergence/optimizer_comm"

    def __init__(
        self, method: str | None = None, log_every_n_steps: int | None = None, on_nonfinite: str = "stop",
        **kwargs: Any,
    ) -> None:
        owner = type(self).__name__
        self.method = check_choice(owner, "method", method, (*METHODS, None))
        self.log_every_n_steps = check_int(owner, "log_every_n_steps", log_every_n_steps, 1, optional=True)
        self.on_nonfinite = check_nonfinite_policy(owner, on_nonfinite)
        super().__init__(**kwargs)
        self.hook_state: OptimizerCommHookState | None = None
        self._pending: dict[str, Any] | None = None
        self._warned = False

    # -- wiring ----------------------------------------------------------------------------------------------------
    @override
    def build_comm_hook(self, model: DistributedDataParallel) -> tuple[Any, Any]:
        self.hook_state = OptimizerCommHookState(self)
        return self.hook_state, optimizer_comm_hook

    def comm_optimizer(self) -> Any:
        """The one optimizer, unwrapped from Lightning's ``LightningOptimizer``."""
        return getattr(self.optimizers[0], "_optimizer", self.optimizers[0])

    def optimizer_owns_step(self) -> bool:
        """Asked by the hook during backward: does the optimizer communicate on the coming step?"""
        return bool(self.comm_optimizer().owns_communication())

    @override
    def setup(self, trainer: Trainer) -> None:
        super().setup(trainer)
        owner = type(self).__name__
        if not trainer.lightning_module.automatic_optimization:
            raise RuntimeError(f"{owner}: needs automatic optimization; set `automatic_optimization = True`.")
        if len(self.optimizers) != 1:
            raise RuntimeError(f"{owner}: needs exactly one optimizer, got {len(self.optimizers)}.")
        opt = self.comm_optimizer()
        if not (hasattr(opt, "attach") and hasattr(opt, "owns_communication")):
            raise RuntimeError(
                f"{owner}: the optimizer must own its communication (lightning_convergence.optim.DeMo or OnebitAdam), "
                f"got {type(opt).__name__}; set `optimizer: class_path: lightning_convergence.optim.DeMo` (or "
                "OnebitAdam) in the config, or return one from `configure_optimizers`."
            )
        if self.method is not None and type(opt).__name__ != METHODS[self.method]:
            raise RuntimeError(
                f"{owner}: `method` {self.method!r} expects the optimizer {METHODS[self.method]}, got "
                f"{type(opt).__name__}."
            )
        opt.attach(TorchDistCommunicator() if dist.is_initialized() else SingleProcessCommunicator())

    # -- per-rank state --------------------------------------------------------------------------------------------
    def rank_state_dict(self) -> dict[str, Any]:
        counters = dict(self.hook_state.counters) if self.hook_state is not None else {}
        opt = self.comm_optimizer()
        return {
            "version": STATE_VERSION,
            "optimizer": opt.state_dict(),
            "link_bytes_total": int(opt.comm.link_bytes_total),
            "counters": counters,
        }

    def load_rank_state_dict(self, state: dict[str, Any]) -> None:
        check_state_version(type(self).__name__, state, STATE_VERSION)
        self._pending = state  # applied after Lightning loads rank 0's optimizer state (load_optimizer_state_dict)

    @override
    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        super().load_optimizer_state_dict(checkpoint)
        self.apply_pending_rank_state()
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        opt = self.comm_optimizer()
        opt.load_state_dict(state["optimizer"])
        opt.comm.link_bytes_total = int(state["link_bytes_total"])
        if self.hook_state is not None:
            self.hook_state.counters.update(state["counters"])

    # -- logging and the non-finite policy ---------------------------------------------------------------------------
    @override
    def optimizer_step(self, *args: Any, **kwargs: Any) -> Any:
        out = super().optimizer_step(*args, **kwargs)
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is not None and self.hook_state is not None and should_log(trainer, self.log_every_n_steps):
            self._log(trainer)
        return out

    def link_bytes_total(self) -> int:
        """Link bytes this rank has sent, as its communicators counted them: the optimizer's collectives plus DDP's
        all-reduces."""
        ddp = self.hook_state.counters["ddp_link_bytes_total"] if self.hook_state is not None else 0
        return int(self.comm_optimizer().comm.link_bytes_total) + int(ddp)

    def _log(self, trainer: Any) -> None:
        opt = self.comm_optimizer()
        skipped = opt.nonfinite_skipped_total
        skipped_total = float(skipped) if skipped is not None else 0.0  # one read per logging step, global already
        if skipped_total > 0:
            self._warned = act_on_nonfinite(
                trainer, type(self).__name__, self.on_nonfinite, "gradient", warned=self._warned
            )
        sent = self.link_bytes_total()
        dense = ddp_link_bytes(opt.dense_bytes(), self.world_size) * (trainer.global_step + 1)
        log_metrics(trainer, "compress", {
            "link_bytes_per_rank_total": sent,
            "ratio": dense / sent if sent else 0.0,
            "nonfinite_skipped_total": skipped_total,
        })

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        """Register our names (Lightning's ``DDPStrategy`` version would register ``ddp`` etc. with this class)."""
        register_strategies()


def register_strategies() -> None:
    """Register ``demo`` and ``onebit_adam`` (DDP that lets the DeMo / OnebitAdam optimizer communicate)."""
    from lightning_convergence.strategies import register_strategy

    for name, text in (("demo", "DeMo: the optimizer sends top-k DCT momentum, no DDP all-reduce"),
                       ("onebit_adam", "1-bit Adam: DDP all-reduce during warm-up, then 1-bit momentum")):
        if name not in StrategyRegistry:
            register_strategy(name, OptimizerCommStrategy, text, method=name)
