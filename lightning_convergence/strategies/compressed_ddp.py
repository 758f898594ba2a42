"""``CompressedDDPStrategy``: DDP whose gradient averaging sends compressed messages with error feedback.

The adapter holds no math: the comm hook asks the feedback rule (:mod:`lightning_convergence.feedback`) for each
parameter's message, averages the messages with :func:`~lightning_convergence.compress.comm.average_payloads`, and
writes the rule's gradient estimate back into the bucket.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import StrategyRegistry
from torch.distributed.constants import default_pg_timeout
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override

from lightning_convergence._metrics import log_metrics, should_log
from lightning_convergence.compress import Compressor, TopK
from lightning_convergence.compress.comm import average_payloads, dist_collectives, first_round
from lightning_convergence.feedback import FeedbackRule, make_rule
from lightning_convergence.feedback.base import DENSE, zero_message
from lightning_convergence.stats import per_tensor_norms
from lightning_convergence.strategies._ddp_base import HookedDDPStrategy

__all__ = ["CompressedDDPStrategy", "CompressionHookState", "compressed_comm_hook", "register_strategies"]

STATE_VERSION = 1


class CompressionHookState:
    """What the comm hook needs: the rule, the compressor, parameter names and the byte counters (per rank)."""

    def __init__(self, rule: FeedbackRule, compressor: Compressor, names: dict[int, str], group: Any = None) -> None:
        self.rule = rule
        self.compressor = compressor
        self.names = names
        self.group = group
        self.world_size = dist.get_world_size(group) if dist.is_initialized() else 1
        self.rank = dist.get_rank(group) if dist.is_initialized() else 0
        self.all_reduce, self.all_gather = dist_collectives(group)
        self.before_call: Any = None
        self.dense = False  # True during the strategy's `start_step` warm-up: plain averaging, rule untouched
        self.counters = {"bytes_sent_total": 0, "dense_bytes_total": 0, "hook_calls_total": 0}

    def name_of(self, param: torch.Tensor) -> str:
        try:
            return self.names[id(param)]
        except KeyError as err:
            raise RuntimeError(
                f"CompressedDDPStrategy: a bucket parameter of shape {tuple(param.shape)} has no known name."
            ) from err


def compressed_comm_hook(state: CompressionHookState, bucket):
    """DDP comm hook: compress every parameter of the bucket with feedback, average, write the estimate back.

    ``(state, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]``; the annotations are left off because DDP
    compares them with the real classes and this module uses postponed (string) annotations.

    Parameters are identified by name (``bucket.parameters()``), so DDP's bucket rebuild after the first iteration
    and any ``bucket_cap_mb`` leave the per-parameter state intact. Runs only on synchronising steps (DDP skips the
    hook inside ``no_sync``, which Lightning uses for gradient accumulation).
    """
    if state.before_call is not None:
        state.before_call()
    grads = bucket.gradients()
    names = [state.name_of(p) for p in bucket.parameters()]
    finite = torch.isfinite(per_tensor_norms(grads, float("inf"))).tolist()  # one host sync per bucket
    if state.dense:  # warm-up: uncompressed average, the rule sees nothing (its state starts at the switch)
        payloads = [
            DENSE.compress(g.detach().to(torch.float32), 0, n) if f else zero_message(DENSE, g, 0, n, True)
            for n, g, f in zip(names, grads, finite)
        ]
        state.rule.nonfinite_skipped_total += finite.count(False)
    else:
        if state.compressor.rounds > 1:  # PowerSGD's first all-reduce, on the inputs the rule compresses next
            state.counters["bytes_sent_total"] += _first_round(state, names, grads, finite)
        payloads = [state.rule.message(n, g, state.compressor, f) for n, g, f in zip(names, grads, finite)]
    means = average_payloads(payloads, state.world_size, state.all_reduce, state.all_gather, state.rank)
    for name, grad, mean in zip(names, grads, means):
        grad.copy_(mean.reshape(grad.shape) if state.dense else state.rule.update(name, mean.reshape(grad.shape)))
    c = state.counters
    c["bytes_sent_total"] += sum(p.nbytes for p in payloads)
    c["dense_bytes_total"] += sum(g.numel() * g.element_size() for g in grads)
    c["hook_calls_total"] += 1
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def _first_round(state: CompressionHookState, names: list[str], grads: list[torch.Tensor], finite: list[bool]) -> int:
    items = []
    for n, g, f in zip(names, grads, finite):
        x = state.rule.compressor_input(n, g)  # None: sent dense this step, on every rank alike (no first round)
        if x is not None:  # a rank with a non-finite gradient joins the collective with zeros
            items.append((n, x if f else torch.zeros_like(x), state.rule.steps.get(n, 0)))
    return first_round(state.compressor, items, state.world_size, state.all_reduce, state.all_gather, state.rank)


class CompressedDDPStrategy(HookedDDPStrategy):
    """Compressed gradient averaging with error feedback (EF21, EF21-SGDM, EControl, classic EF), on CPU or GPU.

    Paper: Richtárik, Sokolov, Fatkhullin. *EF21: A New, Simpler, Theoretically Better, and Practically Faster Error
    Feedback.* NeurIPS 2021, arXiv:2106.05203 (default rule); the other rules cite their papers in
    :mod:`lightning_convergence.feedback`.

    Each rank compresses each parameter's gradient message with ``compressor``; summable payloads (Identity, Rand-K)
    travel in one all-reduce per bucket, the others (Top-K values + indices, sign bits, QSGD codes) in one all-gather
    of their bytes per bucket. The optimizer sees the rule's gradient estimate (EF21's ``g``).

    Deviations: collectives inside the hook are blocking (no overlap of communication with the rest of the backward
    pass); the first step of EF21-type rules is sent uncompressed (``dense_first_step``); the optional dense warm-up
    (``start_step``) is not in the papers' algorithms (it is PowerSGD's ``start_powerSGD_iter``); a parameter whose
    local gradient is non-finite sends zeros and is counted, so AMP's ``GradScaler`` will not see that inf (its scale
    is not lowered): prefer bf16 over fp16 mixed precision here.

    Args:
        feedback: the error-feedback rule: a name (``"ef21"``, ``"ef21_sgdm"``, ``"econtrol"``, ``"ef14"``, or
            ``"none"`` for plain compressed averaging) or a :class:`~lightning_convergence.feedback.FeedbackRule`
            instance (a ``class_path`` in YAML) to set its hyperparameters. Default ``"ef21"``.
        compressor: a :class:`~lightning_convergence.compress.Compressor` (``class_path`` in YAML). Default
            ``TopK(k_fraction=0.01)``: about 50x fewer bytes than float32 DDP.
        every_n_steps: log every this many optimizer steps, ≥ 1. Default ``None``: the trainer's
            ``log_every_n_steps``.
        bucket_cap_mb: DDP bucket size in MiB (``None``: DDP's default of 25). The hook is bucket-agnostic.
        start_step: optimizer steps of plain (uncompressed, float32) gradient averaging before compression starts,
            an int ≥ 0. Default ``0``. The rule and compressor see nothing before it, so their state starts at the
            switch (EF21-type rules with ``dense_first_step`` send the switch step's gradient uncompressed:
            ``g_i = ∇f_i`` there). Like PowerSGD's ``start_powerSGD_iter``; a few percent of the run (e.g. 10–50
            steps) avoids compressing the large, fast-changing gradients of the first steps. Those steps cost DDP's
            bytes (counted in ``bytes_sent_total``).
        find_unused_parameters: passed to DDP. Default ``False``.
        process_group_backend, timeout, start_method, accelerator, parallel_devices, cluster_environment,
            checkpoint_io, precision_plugin: as in Lightning's ``DDPStrategy``.
        **kwargs: further ``DistributedDataParallel`` arguments (not ``ddp_comm_*``).

    State: under ``convergence/compressed_ddp`` in the checkpoint, every rank's rule state (per-parameter buffers by
    name, step counts), compressor state and byte counters, with a ``version`` key; each rank takes its slice back.

    Logs: ``convergence/compress/bytes_sent_total`` (payload bytes sent by all ranks together),
    ``convergence/compress/ratio`` (bytes plain DDP would have sent / bytes sent),
    ``convergence/compress/residual_norm`` (root mean over ranks of each rank's squared error-state norm),
    ``convergence/compress/nonfinite_skipped_total``.

    Raises:
        ValueError: for an unknown ``feedback`` name, ``every_n_steps`` < 1, ``start_step`` < 0, or a ``ddp_comm_*``
            argument.
        TypeError: if ``compressor`` is not a ``Compressor``, ``feedback`` has the wrong type, or ``start_step`` is
            not an int.
        RuntimeError: if hook registration fails, or a checkpoint holds another rule's or world size's state.

    Example::

        Trainer(accelerator="cpu", devices=2, strategy=CompressedDDPStrategy(feedback="ef21", compressor=TopK(0.01)))
    """

    rank_state_key = "convergence/compressed_ddp"

    def __init__(
        self,
        feedback: str | FeedbackRule = "ef21",
        compressor: Compressor | None = None,
        every_n_steps: int | None = None,
        bucket_cap_mb: float | None = None,
        start_step: int = 0,
        find_unused_parameters: bool = False,
        accelerator: Any = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: Any = None,
        checkpoint_io: Any = None,
        precision_plugin: Any = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: str = "popen",
        **kwargs: Any,
    ) -> None:
        owner = type(self).__name__
        compressor = TopK(k_fraction=0.01) if compressor is None else compressor
        if not isinstance(compressor, Compressor):
            raise TypeError(f"{owner}: `compressor` must be a Compressor, got {type(compressor).__name__}.")
        if every_n_steps is not None and (isinstance(every_n_steps, bool) or int(every_n_steps) < 1):
            raise ValueError(f"{owner}: `every_n_steps` must be >= 1 or None, got {every_n_steps!r}.")
        if isinstance(start_step, bool) or not isinstance(start_step, int):
            kind = type(start_step).__name__
            raise TypeError(f"{owner}: `start_step` must be an int >= 0, got {kind} {start_step!r}.")
        if start_step < 0:
            raise ValueError(f"{owner}: `start_step` must be >= 0, got {start_step}.")
        self.start_step = start_step
        self.rule = make_rule(feedback, owner)
        self.rule.check_compressor(compressor)
        if compressor.rounds > 1 and type(self.rule).compressor_input is FeedbackRule.compressor_input:
            raise ValueError(
                f"{owner}: `compressor` {compressor!r} needs {compressor.rounds} rounds per step, which `feedback` "
                f"{type(self.rule).__name__} does not support (it defines no `compressor_input`); use one of "
                "'none', 'ef14', 'ef21', 'ef21_sgdm', 'econtrol', or a single-round compressor."
            )
        self.compressor = compressor
        self.every_n_steps = every_n_steps
        if bucket_cap_mb is not None:
            kwargs["bucket_cap_mb"] = bucket_cap_mb
        super().__init__(
            accelerator=accelerator, parallel_devices=parallel_devices, cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io, precision_plugin=precision_plugin,
            process_group_backend=process_group_backend, timeout=timeout, start_method=start_method,
            find_unused_parameters=find_unused_parameters, **kwargs,
        )
        self.hook_state: CompressionHookState | None = None
        self._pending_counters: dict[str, int] | None = None

    @override
    def build_comm_hook(self, model: DistributedDataParallel) -> tuple[Any, Any]:
        names = {id(p): n for n, p in model.module.named_parameters()}
        self.hook_state = CompressionHookState(self.rule, self.compressor, names)
        self.hook_state.before_call = self._before_hook
        if self._pending_counters is not None:
            self.hook_state.counters.update(self._pending_counters)
            self._pending_counters = None
        return self.hook_state, compressed_comm_hook

    def _before_hook(self) -> None:
        self.apply_pending_rank_state()
        if self.hook_state is not None:
            trainer = self.lightning_module.trainer if self.lightning_module is not None else None
            step = trainer.global_step if trainer is not None else self.start_step  # optimizer steps done so far
            self.hook_state.dense = step < self.start_step

    # -- per-rank state --------------------------------------------------------------------------------------------
    def rank_state_dict(self) -> dict[str, Any]:
        counters = dict(self.hook_state.counters) if self.hook_state is not None else {}
        return {
            "version": STATE_VERSION,
            "feedback": self.rule.state_dict(),
            "compressor": self.compressor.state_dict(),
            "counters": counters,
        }

    def load_rank_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise RuntimeError(f"{type(self).__name__}: state `version` {state.get('version')!r} is not supported.")
        self.rule.load_state_dict(state["feedback"])
        self.compressor.load_state_dict(state["compressor"])
        counters = {k: int(v) for k, v in state.get("counters", {}).items()}
        if self.hook_state is not None:
            self.hook_state.counters.update(counters)
        else:
            self._pending_counters = counters

    # -- logging ---------------------------------------------------------------------------------------------------
    @override
    def optimizer_step(self, *args: Any, **kwargs: Any) -> Any:
        out = super().optimizer_step(*args, **kwargs)
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is not None and self.hook_state is not None and should_log(trainer, self.every_n_steps):
            self._log(trainer)
        return out

    def _log(self, trainer: Any) -> None:
        c = self.hook_state.counters  # type: ignore[union-attr]
        local = torch.tensor(
            [c["bytes_sent_total"], c["dense_bytes_total"], float(self.rule.residual_sq_total()),
             self.rule.nonfinite_skipped_total],
            dtype=torch.float64, device=self.root_device,
        )
        if dist.is_initialized():
            dist.all_reduce(local)  # every rank reaches this on the same steps (global_step is shared)
        sent, dense, res_sq, skipped = local.tolist()
        log_metrics(trainer, "compress", {
            "bytes_sent_total": sent,
            "ratio": dense / sent if sent else 0.0,
            "residual_norm": (res_sq / self.world_size) ** 0.5,
            "nonfinite_skipped_total": skipped,
        })

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        """Register our names (Lightning's ``DDPStrategy`` version would register ``ddp`` etc. with this class)."""
        register_strategies()


_NAMES = {
    "ddp_ef21": ("ef21", "EF21 error feedback, Top-K 1%"),
    "ddp_ef21_sgdm": ("ef21_sgdm", "EF21-SGDM (momentum 0.1) error feedback, Top-K 1%"),
    "ddp_econtrol": ("econtrol", "EControl (eta 0.1) error feedback, Top-K 1%"),
    "ddp_ef14": ("ef14", "classic error feedback (EF14), Top-K 1%"),
}


def register_strategies() -> None:
    """Register ``ddp_ef21``, ``ddp_ef21_sgdm``, ``ddp_econtrol``, ``ddp_ef14`` (DDP, start method ``popen``)."""
    from lightning_convergence.strategies import register_strategy

    for name, (rule, text) in _NAMES.items():
        if name not in StrategyRegistry:
            register_strategy(name, CompressedDDPStrategy, f"Compressed DDP: {text}", feedback=rule)
