"""``CompressedDDPStrategy``: DDP whose gradient averaging sends compressed messages with error feedback.

The adapter holds no math: the comm hook asks the feedback rule (:mod:`lightning_convergence.feedback`) for each
parameter's message, averages the messages through the communication layer
(:func:`~lightning_convergence.comm.average_payloads_async`), and writes the rule's gradient estimate back into the
bucket when the collective completes.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import StrategyRegistry
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from typing_extensions import override

from lightning_convergence._checks import (
    argument_error,
    check_instance,
    check_int,
    check_int_at_least,
    check_state_version,
)
from lightning_convergence._metrics import log_metrics, should_log
from lightning_convergence._nonfinite import act_on_nonfinite, check_nonfinite_policy
from lightning_convergence.comm import (
    Communicator,
    SingleProcessCommunicator,
    TorchDistCommunicator,
    average_payloads_async,
    ddp_link_bytes,
    first_round,
    link_bytes_per_rank,
)
from lightning_convergence.compress import Compressor, TopK
from lightning_convergence.feedback import FeedbackRule, make_rule
from lightning_convergence.feedback.base import DENSE
from lightning_convergence.strategies._ddp_base import HookedDDPStrategy

__all__ = [
    "CompressedDDPStrategy", "CompressionHookState", "check_saving", "compressed_comm_hook", "register_strategies",
]

STATE_VERSION = 1  # counters gained `nonfinite_skipped_total`; a missing counter loads as 0
_COUNTERS = ("bytes_sent_total", "dense_bytes_total", "hook_calls_total", "nonfinite_skipped_total")


class CompressionHookState:
    """Everything the comm hook touches: the rule, the compressor, parameter names, the communicator, the counters
    and this step's non-finite count (a device tensor; the strategy reads it once per optimizer step).

    Args:
        rule: the feedback rule (per-parameter state by name).
        compressor: the compressor (already bound to the group).
        names: parameter ``id`` → name.
        comm: the communicator the payloads travel over.
    """

    def __init__(self, rule: FeedbackRule, compressor: Compressor, names: dict[int, str], comm: Communicator) -> None:
        self.rule = rule
        self.compressor = compressor
        self.names = names
        self.comm = comm
        self.dense = False  # set by the strategy before each backward: the `start_step` warm-up (plain averaging)
        self.counters = dict.fromkeys(_COUNTERS, 0)
        self.step_nonfinite: list[torch.Tensor] = []  # flagged-rank counts of this step's buckets, on the device

    def name_of(self, param: torch.Tensor) -> str:
        try:
            return self.names[id(param)]
        except KeyError as err:
            raise RuntimeError(
                f"CompressedDDPStrategy: a bucket parameter of shape {tuple(param.shape)} has no known name."
            ) from err

    def layout(self, bucket: Any) -> tuple[list[str], list[torch.Tensor]]:
        """The bucket's parameter names and gradients (views of its buffer), sorted by name."""
        rows = sorted(zip((self.name_of(p) for p in bucket.parameters()), bucket.gradients()), key=lambda t: t[0])
        return [r[0] for r in rows], [r[1] for r in rows]

    def add_nonfinite(self, count: torch.Tensor) -> None:
        # called from the collectives' callbacks, possibly on two threads at once: list.append is atomic
        self.step_nonfinite.append(count.reshape(1))

    def take_nonfinite(self) -> bool:
        """Whether any rank flagged a bucket this step (the one host read per optimizer step); resets the counts and
        closes the rule's step (a flagged rank's rule state goes back to its old values)."""
        counts, self.step_nonfinite = self.step_nonfinite, []
        flagged = bool(counts) and bool(torch.cat(counts).sum() > 0)
        self.rule.end_step(flagged)
        return flagged


def compressed_comm_hook(state: CompressionHookState, bucket):
    """DDP comm hook: compress every parameter of the bucket with feedback, average, write the estimate back.

    ``(state, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]``; the annotations are left off because DDP
    compares them with the real classes and this module uses postponed (string) annotations.

    The averaging collective is left in flight and the returned future is chained with ``.then()``; a two-round
    compressor's first round and the 8-bit all-to-all are waited for here (collectives are issued from this thread
    only, so every rank issues them in the same order). Non-finite gradients are found on the device: a flagged
    rank's messages are zeros and its flag travels in the same collective. Parameters are ordered and keyed by name,
    so bucket rebuilds and any ``bucket_cap_mb`` leave the per-parameter state and the float summation order intact.
    """
    buffer = bucket.buffer()
    # NaN/inf anywhere makes the float32 sum non-finite (one reduction; a finite bucket whose sum overflows float32,
    # |sum| > 3e38, would count as non-finite too); 1.0 flags this rank's bucket
    ok = torch.isfinite(buffer.sum(dtype=torch.float32))
    bad = (~ok).to(torch.float32)
    comm, before = state.comm, state.comm.link_bytes_total
    if state.dense:  # warm-up: uncompressed float32 average of the whole bucket, the rule sees nothing
        flat = torch.where(ok, buffer, 0.0).to(torch.float32)  # a flagged bucket contributes zeros
        fut = average_payloads_async([DENSE.compress(flat, 0, "bucket")], comm, bad)

        def finish(f: torch.futures.Future) -> torch.Tensor:
            (mean,), count = f.value()
            state.add_nonfinite(count)
            return buffer.copy_(mean)
    else:
        # by name: the message layout (and so a ring all-reduce's float summation order) does not depend on the
        # order in which DDP put the parameters into the bucket, which changes when DDP rebuilds its buckets
        # a flagged rank's messages are zeroed on the device and its rule state is put back once the step's flags
        # are known (CompressionHookState.take_nonfinite), so the gradients are used as they are (no cleaned copy)
        names, grads = state.layout(bucket)
        rule, compressor = state.rule, state.compressor
        if compressor.rounds > 1:  # the first round (PowerSGD's P, cyclic Top-K's indices) on the rules' inputs
            items = [(n, x, rule.steps.get(n, 0)) for n, g in zip(names, grads)
                     if (x := rule.compressor_input(n, g)) is not None]
            first_round(compressor, items, comm, bad)
        payloads = [rule.message(n, g, compressor, ok) for n, g in zip(names, grads)]
        # float32 buckets receive the means in place (no temporaries, no copy back)
        fut = average_payloads_async(payloads, comm, bad, out=grads if buffer.dtype == torch.float32 else None)

        def finish(f: torch.futures.Future) -> torch.Tensor:
            means, count = f.value()
            state.add_nonfinite(count)
            for name, grad, mean in zip(names, grads, means):
                estimate = rule.update(name, mean if mean is grad else mean.reshape(grad.shape))
                if estimate is not grad:
                    grad.copy_(estimate)
            return buffer

    c = state.counters
    c["bytes_sent_total"] += comm.link_bytes_total - before
    c["dense_bytes_total"] += ddp_link_bytes(buffer.numel() * buffer.element_size(), comm.world_size)
    c["hook_calls_total"] += 1
    return fut.then(finish)


def check_saving(owner: str, compressor: Compressor, world_size: int) -> None:
    """Raise when ``compressor``'s payloads travel by all-gather and so send at least as many link bytes as plain
    DDP at ``world_size`` (a 1000 x 1000 float32 probe): ``(W−1)·c`` per rank against DDP's ``2(W−1)/W·D``. Summed
    payloads never cost more than DDP (``Identity`` costs the same: it is the uncompressed reference)."""
    if world_size <= 1 or compressor.transport != "all_gather":
        return
    shape = (1000, 1000)
    ours = link_bytes_per_rank(compressor, shape, world_size)
    ddp = ddp_link_bytes(4 * shape[0] * shape[1], world_size)
    if ours is not None and ours >= ddp:
        raise ValueError(
            f"{owner}: `compressor` {compressor!r} travels by {compressor.transport}, which at world size "
            f"{world_size} sends {ours} bytes per rank for a 1000x1000 float32 gradient against plain DDP's {ddp}: "
            "no saving. Use a scheme whose payloads are summed on the wire (CyclicTopK, LowRank, RandK) or a "
            "smaller fraction."
        )


class CompressedDDPStrategy(HookedDDPStrategy):
    """Compressed gradient averaging with error feedback (EF21, EF21-SGDM, EControl, classic EF), on CPU or GPU.

    Paper: Richtárik, Sokolov, Fatkhullin. *EF21: A New, Simpler, Theoretically Better, and Practically Faster Error
    Feedback.* NeurIPS 2021, arXiv:2106.05203 (default rule); the other rules and compressors cite their papers in
    :mod:`lightning_convergence.feedback` and :mod:`lightning_convergence.compress`.

    Each rank compresses each parameter's gradient message with ``compressor``; per bucket, summable payloads travel
    in one ring all-reduce (8-bit reduce-scatter + all-gather with ``LowRank(factor_bits=8)``), the others in one
    all-gather; each compressor's docstring gives its link bytes per rank as a function of ``W``. The optimizer sees
    the rule's gradient estimate. Non-finite gradients are found on the device; once per optimizer step the strategy
    reads the reduced flag (one host read, as AMP's ``GradScaler``) and applies ``on_nonfinite`` to the whole step.

    Deviations: EF21-type rules send their first step uncompressed (``dense_first_step``); ``start_step`` (a dense
    warm-up, PowerSGD's ``start_powerSGD_iter``) is not in the EF papers; on a skipped step the finite ranks' rule
    states keep that step's update (replicas stay identical); AMP's ``GradScaler`` never sees the inf: prefer bf16.

    Args:
        feedback: the error-feedback rule: a name (``"ef21"``, ``"ef21_sgdm"``, ``"econtrol"``, ``"ef14"``, or
            ``"none"`` for plain compressed averaging) or a :class:`~lightning_convergence.feedback.FeedbackRule`
            instance (a ``class_path`` in YAML) to set its hyperparameters. Default ``"ef21"``.
        compressor: a :class:`~lightning_convergence.compress.Compressor` (``class_path`` in YAML). Default
            ``TopK(k_fraction=0.01)``: 50x fewer link bytes than DDP at 2 ranks, ``100/W``x at ``W`` ranks
            (all-gather); ``CyclicTopK(0.01)`` keeps 67x at every ``W``.
        log_every_n_steps: log every this many optimizer steps, an int ≥ 1. Default ``None``: the trainer's
            ``log_every_n_steps``.
        bucket_cap_mb: DDP bucket size in MiB (``None``: DDP's default of 25). The hook is bucket-agnostic.
        start_step: optimizer steps of plain (uncompressed, float32) gradient averaging before compression starts,
            an int ≥ 0. Default ``0``. The rule and compressor see nothing before it, so their state starts at the
            switch. Like PowerSGD's ``start_powerSGD_iter``; a few percent of the run (e.g. 10–50 steps) avoids
            compressing the large, fast-changing gradients of the first steps. Those steps cost DDP's bytes.
        on_nonfinite: ``"stop"`` (default: the step is not applied and training stops with a message) or ``"skip"``
            (the step is not applied, counted once under ``nonfinite_skipped_total``, training goes on).
        find_unused_parameters: passed to DDP. Default ``False``.
        process_group_backend, timeout, start_method, accelerator, parallel_devices, cluster_environment,
            checkpoint_io, precision_plugin: as in Lightning's ``DDPStrategy``.
        **kwargs: further ``DistributedDataParallel`` arguments (not ``ddp_comm_*``).

    State: under ``convergence/compressed_ddp`` in the checkpoint, every rank's rule state (per-parameter buffers by
    name, step counts), compressor state and counters, with a ``version`` key; each rank takes its slice back.

    Logs: ``convergence/compress/bytes_sent_total`` (link bytes sent by all ranks together, under each collective's
    real algorithm), ``convergence/compress/ratio`` (link bytes plain DDP sends at the same world size / ours),
    ``convergence/compress/residual_norm`` (root mean over ranks of each rank's squared error-state norm),
    ``convergence/compress/nonfinite_skipped_total`` (optimizer steps skipped).

    Raises:
        ValueError: for an unknown ``feedback`` name, ``log_every_n_steps`` < 1, ``start_step`` < 0, a bad
            ``on_nonfinite``, a ``ddp_comm_*`` argument, or (at setup) a compressor that cannot run on this world
            size or backend (the message names the field).
        TypeError: if ``compressor`` is not a ``Compressor``, ``feedback`` has the wrong type, or ``start_step`` is
            not an int.
        RuntimeError: if hook registration fails, or a checkpoint holds another rule's or world size's state.

    Example::

        Trainer(accelerator="cpu", devices=4, strategy=CompressedDDPStrategy(feedback="ef14", compressor=CyclicTopK()))
    """

    rank_state_key = "convergence/compressed_ddp"

    def __init__(
        self,
        feedback: str | FeedbackRule = "ef21",
        compressor: Compressor | None = None,
        log_every_n_steps: int | None = None,
        start_step: int = 0,
        on_nonfinite: str = "stop",
        **kwargs: Any,
    ) -> None:
        owner = type(self).__name__
        compressor = TopK(k_fraction=0.01) if compressor is None else compressor
        check_instance(owner, "compressor", compressor, Compressor, "a Compressor")
        check_int(owner, "log_every_n_steps", log_every_n_steps, 1, optional=True)
        self.on_nonfinite = check_nonfinite_policy(owner, on_nonfinite)
        self.start_step = check_int_at_least(owner, "start_step", start_step, 0)
        self.rule = make_rule(feedback, owner)
        self.rule.check_compressor(compressor)
        if compressor.rounds > 1 and type(self.rule)._inputs is FeedbackRule._inputs:
            raise argument_error(
                owner, "feedback", f"one of 'none', 'ef14', 'ef21', 'ef21_sgdm', 'econtrol' with `compressor` "
                f"{compressor!r}, which needs {compressor.rounds} rounds per step", type(self.rule).__name__,
                hint="A rule without `_inputs` supports single-round compressors only.")
        self.compressor = compressor
        self.log_every_n_steps = log_every_n_steps
        super().__init__(**kwargs)  # bucket_cap_mb and Lightning's DDP arguments: HookedDDPStrategy
        self.hook_state: CompressionHookState | None = None
        self._pending_counters: dict[str, int] | None = None
        self._stats_comm: Communicator | None = None
        self._warned_skip = False

    @override
    def build_comm_hook(self, model: DistributedDataParallel) -> tuple[Any, Any]:
        comm: Communicator = TorchDistCommunicator() if dist.is_initialized() else SingleProcessCommunicator()
        self.compressor.bind(comm.rank, comm.world_size, comm.backend, self.root_device.type)
        check_saving(type(self).__name__, self.compressor, comm.world_size)
        if comm.world_size == 1:
            warnings.warn(
                f"{type(self).__name__}: world size 1, so nothing is sent and compression saves no bytes; the "
                "optimizer still sees the compressed, error-fed gradient estimate (`feedback`, `compressor`), so "
                "training changes as it would on several devices. Use more devices, or plain DDP.",
                stacklevel=2,
            )
        names = {id(p): n for n, p in model.module.named_parameters()}
        self.hook_state = CompressionHookState(self.rule, self.compressor, names, comm)
        self._stats_comm = TorchDistCommunicator() if dist.is_initialized() else SingleProcessCommunicator()
        if self._pending_counters is not None:
            self.hook_state.counters.update(self._pending_counters)
            self._pending_counters = None
        return self.hook_state, compressed_comm_hook

    @override
    def on_train_start(self) -> None:
        super().on_train_start()
        self.apply_pending_rank_state()

    @override
    def pre_backward(self, closure_loss: torch.Tensor) -> None:
        super().pre_backward(closure_loss)
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if self.hook_state is not None and trainer is not None:
            self.hook_state.dense = trainer.global_step < self.start_step  # optimizer steps done so far

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
        check_state_version(type(self).__name__, state, STATE_VERSION)
        self.rule.load_state_dict(state["feedback"])
        self.compressor.load_state_dict(state["compressor"])
        counters = {k: int(v) for k, v in state.get("counters", {}).items()}
        if self.hook_state is not None:
            self.hook_state.counters.update(counters)
        else:
            self._pending_counters = counters

    # -- the step: one non-finite decision, then logging -----------------------------------------------------------
    @override
    def optimizer_step(self, optimizer: Optimizer, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        if self.hook_state is None:
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        result = closure()  # forward + backward: DDP has waited for every bucket's future when it returns
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if self.hook_state.take_nonfinite():  # the same decision on every rank: the flag was reduced
            if trainer is not None:
                self._warned_skip = act_on_nonfinite(
                    trainer, "CompressedDDPStrategy", self.on_nonfinite, "gradients", warned=self._warned_skip
                )
            if self.on_nonfinite == "skip":
                self.hook_state.counters["nonfinite_skipped_total"] += 1
            out = result
        else:
            out = super().optimizer_step(optimizer, lambda: result, model, **kwargs)
        if trainer is not None and should_log(trainer, self.log_every_n_steps):
            self._log(trainer)
        return out

    def _log(self, trainer: Any) -> None:
        c = self.hook_state.counters  # type: ignore[union-attr]
        local = torch.stack([
            torch.tensor([c["bytes_sent_total"], c["dense_bytes_total"]], dtype=torch.float64),
            torch.stack([self.rule.residual_sq_total().double().cpu(),
                         torch.tensor(float(c["nonfinite_skipped_total"]), dtype=torch.float64)]),
        ]).reshape(-1).to(self.root_device)
        self._stats_comm.all_reduce_sum(local)  # type: ignore[union-attr]  # every rank logs on the same steps
        sent, dense, res_sq, _ = local.tolist()  # logging steps only
        log_metrics(trainer, "compress", {
            "bytes_sent_total": sent,
            "ratio": dense / sent if sent else 1.0,
            "residual_norm": (res_sq / self.world_size) ** 0.5,
            "nonfinite_skipped_total": float(c["nonfinite_skipped_total"]),  # identical on every rank
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
