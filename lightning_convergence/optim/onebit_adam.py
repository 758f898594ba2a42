"""1-bit Adam: Adam warm-up, then frozen variance and 1-bit compressed momentum averaging (imports torch only).

After ``start_step`` the optimizer owns the data-parallel communication: DDP's gradient all-reduce must be off on
those steps (:class:`~lightning_convergence.strategies.OptimizerCommStrategy` does that) and the collectives come
through :meth:`OnebitAdam.attach`. Before it, gradients must arrive averaged (DDP does it) and the step is AdamW.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from lightning_convergence._checks import check_int_at_least, check_number, check_numbers
from lightning_convergence.comm import Communicator
from lightning_convergence.compress.base import pack_bits, unpack_bits
from lightning_convergence.optim._comm_optimizer import CommOptimizer, where_ok

__all__ = ["OnebitAdam", "OnebitLayout", "compressed_allreduce"]


class OnebitLayout:
    """Where each parameter's momentum sits in the compressed all-reduce (built once from the parameter sizes).

    Each parameter is zero-padded to a multiple of ``W·lcm(W, 8)`` entries (DeepSpeed's ``corrected_tensor_size``)
    and cut into ``W`` equal chunks; rank ``r`` is the server of chunk ``r`` of every parameter. ``rows`` is the
    ``(W, C)`` server order (row ``r``: chunk ``r`` of every parameter), ``C = Σ_p chunk_p``.
    """

    def __init__(self, numels: list[int], world_size: int, device: torch.device | str = "cpu") -> None:
        unit = world_size * (world_size * 8 // math.gcd(world_size, 8))
        padded = [-(-n // unit) * unit for n in numels]
        chunks = [n // world_size for n in padded]
        self.world_size = world_size
        self.numels = numels
        self.padded = padded
        self.chunks = chunks
        self.num_params = len(numels)
        self.row_size = sum(chunks)
        total = sum(numels)
        starts = torch.tensor([0] + numels[:-1]).cumsum(0).tolist()
        # gather index from the flat (unpadded, + one trailing zero) momentum into (W, C) rows; padding reads the zero
        rows = []
        for r in range(world_size):
            for n, c, s in zip(numels, chunks, starts):
                pos = torch.arange(r * c, (r + 1) * c)
                rows.append(torch.where(pos < n, pos + s, total))
        self.gather_index = torch.cat(rows).to(device)
        # padded-param-order segment ids (for worker scales) of the row layout, and of one row (server scales)
        row_seg = torch.cat([torch.full((c,), i) for i, c in enumerate(chunks)])
        self.row_segments = row_seg.to(device)
        self.all_segments = row_seg.repeat(world_size).to(device)
        # inverse of the gather for real entries: flat position i sits at rows position flat_index[i]
        valid = (self.gather_index < total).nonzero().squeeze(1)
        self.flat_index = torch.empty(total, dtype=torch.long, device=device)
        self.flat_index[self.gather_index[valid]] = valid
        self.padded_numel = torch.tensor(padded, dtype=torch.float32, device=device)
        self.chunk_numel = torch.tensor(chunks, dtype=torch.float32, device=device)

    def to_rows(self, flat: Tensor) -> Tensor:
        """Flat momentum (``Σ numels``) → ``(W, C)`` rows with zero padding."""
        return torch.cat([flat, flat.new_zeros(1)])[self.gather_index].reshape(self.world_size, self.row_size)

    def to_flat(self, rows: Tensor) -> Tensor:
        """Inverse of :meth:`to_rows` (padding dropped)."""
        return rows.reshape(-1)[self.flat_index]


def _rms_by_segment(x: Tensor, segments: Tensor, count: Tensor) -> Tensor:
    """Per-segment ``‖x_seg‖ / sqrt(count_seg)`` (DeepSpeed's scale), one scatter for all segments."""
    sq = torch.zeros(count.shape[0], dtype=x.dtype, device=x.device).index_add_(0, segments, x * x)
    return (sq / count).sqrt()


def _signs(x: Tensor) -> Tensor:
    """1 where ``x ≥ 0`` (DeepSpeed's ``sign().add_(1).bool()``: zero counts as +1), else 0; bool."""
    return x >= 0


def compressed_allreduce(
    momentum: Tensor, worker_error: Tensor, server_error: Tensor, layout: OnebitLayout, comm: Communicator,
    ok_local: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """1-bit average of every rank's flat ``momentum`` with worker and server error compensation.

    DeepSpeed's ``NcclBackend.compressed_allreduce`` per parameter, batched over all parameters: worker: ``x = m +
    e_w``, scale ``s = ‖x‖/√n`` per padded parameter, ``e_w ← x − s·sign(x)``, 1-bit signs all-to-all (rank ``r``
    receives chunk ``r`` from everyone, with the scales); server: ``y = (1/W) Σ_r s_r·sign_r + e_s``, scale per chunk,
    ``e_s ← y − s'·sign(y)``, signs and scales all-gathered; result ``s'_r·sign(y_r)`` for each chunk ``r``.

    ``worker_error`` is ``(W, C)``, ``server_error`` is ``(C,)``; ``ok_local`` (bool scalar) rides along with the
    scales. Returns ``(average, new worker error, new server error, ok)`` where ``ok`` is True iff every rank's flag
    was; the caller keeps the old state when it is False.
    """
    w, c, npar = layout.world_size, layout.row_size, layout.num_params
    x = layout.to_rows(momentum) + worker_error
    w_scale = _rms_by_segment(x.reshape(-1), layout.all_segments, layout.padded_numel.to(x.dtype))
    s = _signs(x)
    new_worker_error = x - w_scale[layout.all_segments].reshape(w, c) * (s.to(x.dtype) * 2 - 1)
    header = torch.cat([w_scale, ok_local.to(x.dtype).reshape(1)]).view(torch.uint8)
    packed = pack_bits(s.reshape(-1), 1).reshape(w, c // 8)
    recv = comm.all_to_all(torch.cat([packed, header.expand(w, -1)], dim=1)).reshape(w, -1)  # row r to rank r
    signs = unpack_bits(recv[:, : c // 8].reshape(-1), 1, w * c).reshape(w, c).to(x.dtype) * 2 - 1
    info = recv[:, c // 8:].clone().view(x.dtype)  # (W, P + 1): sender's scales, then its flag
    ok = (info[:, npar] > 0.5).all()
    y = (signs * info[:, layout.row_segments]).sum(0) / w + server_error
    s_scale = _rms_by_segment(y, layout.row_segments, layout.chunk_numel.to(x.dtype))
    t = _signs(y)
    new_server_error = y - s_scale[layout.row_segments] * (t.to(y.dtype) * 2 - 1)
    blob = torch.cat([pack_bits(t, 1), s_scale.view(torch.uint8)])
    rows = []
    for theirs in comm.all_gather(blob):
        bits = unpack_bits(theirs[: c // 8], 1, c).to(x.dtype) * 2 - 1
        rows.append(bits * theirs[c // 8:].clone().view(x.dtype)[layout.row_segments])
    return layout.to_flat(torch.stack(rows)), new_worker_error, new_server_error, ok


class OnebitAdam(CommOptimizer):
    """1-bit Adam: AdamW for ``start_step`` steps, then frozen variance and 1-bit error-compensated momentum averaging.

    Warm-up (steps ``1..start_step``, gradients averaged by DDP): exactly ``torch.optim.AdamW`` (with
    ``bias_correction=True``). Afterwards each rank updates its momentum with its *local* gradient,
    ``m ← β1·m + (1−β1)·g_r``, the momenta are averaged by :func:`compressed_allreduce` (1 bit per entry plus one
    scale per parameter chunk, each way), the variance ``v`` stays frozen, and
    ``p ← p − lr·(m̂/(√v̂ + eps) + weight_decay·p)``.

    Paper: Tang, Gan, Awan, Rajbhandari, Li, Lian, Liu, Zhang, He. *1-bit Adam: Communication Efficient Large-Scale
    Training with Adam's Convergence Speed.* ICML 2021, arXiv:2102.02888, Algorithm 1. We follow DeepSpeed's
    ``deepspeed/runtime/fp16/onebit/adam.py`` and ``runtime/comm/nccl.py``: the switch after ``freeze_step`` steps,
    the compressed momentum replacing the local one (``exp_avg.set_(...)``), RMS scales (``‖x‖/√n``) per padded
    parameter on the worker and per chunk on the server, zero sent as +1, padding to a multiple of ``W·lcm(W, 8)``,
    eps outside the square root, weight decay added to the update.

    Deviations: ``bias_correction=True`` (default) divides by ``1−β1^t`` and, after freezing, by the frozen
    ``1−β2^start_step`` (DeepSpeed's update has no bias correction: set ``False`` to match it); DeepSpeed's first
    ``step()`` only allocates buffers and applies no update, ours is a normal step; resume restores both error
    buffers exactly (DeepSpeed resets them on load); no ``exp_avg_mask``; a step where any rank's gradient is
    non-finite changes nothing on any rank (no host sync) and is counted, but still advances the step counter
    (bias correction and the switch stay in lockstep across ranks).

    Args:
        params: parameters or parameter groups.
        lr: learning rate, > 0. Default ``1e-3``.
        betas: ``(β1, β2)``, each in [0, 1). Default ``(0.9, 0.999)``.
        eps: added to ``√v̂``, > 0. Default ``1e-8``.
        weight_decay: decoupled (AdamW) weight decay, ≥ 0. Default ``0.01``.
        start_step: warm-up steps of uncompressed AdamW before the variance freezes (DeepSpeed's ``freeze_step``),
            an int ≥ 1. Default ``1000``. The paper uses 15–25% of training; too short freezes a noisy ``v``.
        bias_correction: see Deviations. Default ``True``.

    State: per parameter ``exp_avg``, ``exp_avg_sq``; ``step`` (an int) in every parameter group;
    ``state_dict()["onebit"]`` holds ``version``, ``worker_error``, ``server_error`` (this rank's) and
    ``nonfinite_skipped_total``.

    Raises:
        ValueError: for ``lr`` ≤ 0, betas outside [0, 1), ``eps`` ≤ 0, ``weight_decay`` < 0 or ``start_step`` < 1.
        TypeError: for a non-number, or a non-int ``start_step``.

    Example::

        opt = OnebitAdam(model.parameters(), lr=3e-3, start_step=100)  # with OptimizerCommStrategy in Lightning
    """

    extra_key = "onebit"
    extra_tensors = ("worker_error", "server_error", "nonfinite_skipped_total")

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] | list[float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        start_step: int = 1000,
        bias_correction: bool = True,
    ) -> None:
        lr = check_number("OnebitAdam", "lr", lr, 0, low_open=True)
        betas = tuple(check_numbers("OnebitAdam", "betas", betas, 2, 0, 1, high_open=True))
        eps = check_number("OnebitAdam", "eps", eps, 0, low_open=True)
        weight_decay = check_number("OnebitAdam", "weight_decay", weight_decay, 0)
        check_int_at_least("OnebitAdam", "start_step", start_step, 1)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, step=0)
        super().__init__(params, defaults)
        self.start_step = start_step
        self.bias_correction = bool(bias_correction)
        self.worker_error: Tensor | None = None
        self.server_error: Tensor | None = None
        self._layout: OnebitLayout | None = None

    def attach(self, comm: Communicator) -> None:
        """Use ``comm`` for the compressed momentum averaging (the strategy calls this once the group exists)."""
        super().attach(comm)
        self._layout = None

    @property
    def steps_done(self) -> int:
        """Optimizer steps taken so far (skipped ones included)."""
        return int(self.param_groups[0]["step"])

    def owns_communication(self) -> bool:
        """True once the warm-up is over: this step averages momenta itself and DDP must not all-reduce."""
        return self.steps_done >= self.start_step

    def layout(self) -> OnebitLayout:
        if self._layout is None:
            ps = self.comm_params()
            self._layout = OnebitLayout([p.numel() for p in ps], self.comm.world_size, ps[0].device)
        return self._layout

    def _init_state(self, p: Tensor) -> dict[str, Tensor]:
        state = self.state[p]
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = self.run_closure(closure)
        ps = self.comm_params()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in ps]
        ok = torch.stack(torch._foreach_norm(grads, float("inf"))).isfinite().all()
        compressed = self.owns_communication()
        for group in self.param_groups:
            group["step"] += 1
        if compressed:
            ok = self._compressed_momentum(ps, grads, ok)
        else:
            self._adam_moments(ok)
        self._update(ok)
        self.count_skip(ok)
        return loss

    def _adam_moments(self, ok: Tensor) -> None:
        """Warm-up: both moments from the (DDP-averaged) gradient, unchanged when ``ok`` is False."""
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            mine = [p for p in group["params"] if p.requires_grad]
            states = [self._init_state(p) for p in mine]
            g = [torch.where(ok, p.grad, 0.0) if p.grad is not None else torch.zeros_like(p) for p in mine]
            m, v = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
            torch._foreach_mul_(m, where_ok(ok, beta1, 1.0, mine[0]))
            torch._foreach_add_(m, g, alpha=1.0 - beta1)
            torch._foreach_mul_(v, where_ok(ok, beta2, 1.0, mine[0]))
            torch._foreach_addcmul_(v, g, g, value=1.0 - beta2)

    def _compressed_momentum(self, ps: list[Tensor], grads: list[Tensor], ok_local: Tensor) -> Tensor:
        """After the switch: local momentum update, then the 1-bit average replaces it on every rank."""
        beta1 = self.param_groups[0]["betas"][0]
        layout = self.layout()
        states = [self._init_state(p) for p in ps]
        old = torch.cat([s["exp_avg"].reshape(-1) for s in states])
        g = torch.cat([gr.reshape(-1) for gr in grads])
        local = old * beta1 + torch.where(ok_local, g, 0.0) * (1.0 - beta1)
        if self.worker_error is None or self.server_error is None:
            self.worker_error = old.new_zeros(layout.world_size, layout.row_size)
            self.server_error = old.new_zeros(layout.row_size)
        if layout.world_size == 1:  # no communication: the local momentum is the average (DeepSpeed: size > 1)
            avg, we, se, ok = local, self.worker_error, self.server_error, ok_local
        else:
            avg, we, se, ok = compressed_allreduce(
                local, self.worker_error, self.server_error, layout, self.comm, ok_local
            )
        self.worker_error = torch.where(ok, we, self.worker_error)
        self.server_error = torch.where(ok, se, self.server_error)
        new = torch.where(ok, avg, old)
        torch._foreach_copy_([s["exp_avg"] for s in states], [t.view_as(p) for t, p in zip(
            new.split([p.numel() for p in ps]), ps)])
        return ok

    def _update(self, ok: Tensor) -> None:
        """``p ← p(1 − lr·wd) − lr/bc1 · m / (√v/√bc2 + eps)``; nothing changes when ``ok`` is False."""
        for group in self.param_groups:
            mine = [p for p in group["params"] if p.requires_grad]
            if not mine:
                continue
            beta1, beta2 = group["betas"]
            t = group["step"]
            frozen_t = min(t, self.start_step)
            bc1 = 1.0 - beta1**t if self.bias_correction else 1.0
            bc2 = 1.0 - beta2**frozen_t if self.bias_correction else 1.0
            states = [self.state[p] for p in mine]
            denom = torch._foreach_sqrt([s["exp_avg_sq"] for s in states])
            torch._foreach_div_(denom, math.sqrt(bc2))
            torch._foreach_add_(denom, group["eps"])
            if group["weight_decay"] != 0.0:
                torch._foreach_mul_(mine, where_ok(ok, 1.0 - group["lr"] * group["weight_decay"], 1.0, mine[0]))
            upd = torch._foreach_div([s["exp_avg"] for s in states], denom)
            torch._foreach_mul_(upd, where_ok(ok, -group["lr"] / bc1, 0.0, mine[0]))
            torch._foreach_add_(mine, upd)
