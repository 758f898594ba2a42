"""The server-rule interface shared by every federated aggregation rule (torch only, no Lightning).

A :class:`ServerRule` owns the global model (a ``{name: tensor}`` dict), a version counter (one per server model
update) and the bookkeeping every rule needs: de-duplication by ``(client_id, update_seq)``, rejection of non-finite
deltas, staleness statistics and per-client participation counts. A subclass implements :meth:`ServerRule._accept`
(what to do with one accepted delta) and, for windowed or round-based rules, :meth:`ServerRule.advance` /
:meth:`ServerRule.close_round`.

Conventions used by every rule:

* a client's *delta* is ``Δ = w_local − w_sent`` (its progress; the server moves ``w ← w + η_g·agg(Δ)``);
* ``base_version`` is the version of the global model the client started from; staleness ``τ = version − base``;
* every accepted update is folded into the model exactly once: ``updates_accepted_total == updates_applied_total +
  pending`` holds at all times, and a checkpoint holds the pending buffer, so a resume neither loses nor repeats one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from lightning_convergence._checks import argument_error, check_choice, check_int, check_number, check_state_version
from lightning_convergence.stats import all_finite

__all__ = ["ParamDict", "ServerRule", "staleness_weight", "weighted_sum", "STALENESS_FUNCTIONS"]

ParamDict = dict[str, Tensor]
STALENESS_FUNCTIONS = ("constant", "polynomial", "hinge")
_COUNTERS = (
    "updates_received_total", "updates_accepted_total", "updates_applied_total", "nonfinite_skipped_total",
    "duplicate_skipped_total", "stale_rejected_total",
)


def staleness_weight(staleness: int, kind: str = "polynomial", a: float = 0.5, b: int = 4) -> float:
    """FedAsync's staleness functions s(τ) (Xie et al. 2019, arXiv:1903.03934, Sec. 5).

    ``constant``: 1. ``polynomial``: (τ + 1)^(−a). ``hinge``: 1 if τ ≤ b else 1 / (a(τ − b) + 1).
    """
    check_choice("staleness_weight", "kind", kind, STALENESS_FUNCTIONS)
    if staleness < 0:
        raise argument_error("staleness_weight", "staleness", ">= 0", staleness)
    if kind == "constant":
        return 1.0
    if kind == "polynomial":
        return float((staleness + 1) ** (-a))
    return 1.0 if staleness <= b else 1.0 / (a * (staleness - b) + 1.0)  # hinge


def _check_staleness_args(owner: str, kind: str, a: float, b: int) -> None:
    check_choice(owner, "staleness", kind, STALENESS_FUNCTIONS)
    check_number(owner, "staleness_a", a, 0)
    check_int(owner, "staleness_b", b, 0)


class ServerRule:
    """Base class of the federated server rules: global model, version counter, exactly-once bookkeeping.

    Args:
        server_lr: η_g, the server step size applied to the aggregated delta, > 0. Default ``1.0`` (plain averaging).
        max_staleness: updates staler than this many versions are rejected (counted in ``stale_rejected_total``);
            ``None`` accepts any staleness. Default ``None``.

    State:
        ``params`` (global model by parameter name), ``version``, counters, per-client last ``update_seq``,
        staleness histogram, per-client participation counts, plus each rule's own buffers.

    Raises:
        ValueError: for a non-positive ``server_lr`` or negative ``max_staleness``; from :meth:`receive` for a
            delta whose names or shapes differ from the global model or a ``base_version`` from the future.
    """

    name = "base"
    #: True when a client receives its next model only after the next aggregation (rounds, fixed windows).
    synchronous = False
    #: True for rules that run in rounds with a known participant set (FedAvg, FedProx, FedAU).
    round_based = False
    STATE_VERSION = 1

    def __init__(self, server_lr: float = 1.0, max_staleness: int | None = None) -> None:
        owner = type(self).__name__
        self.server_lr = check_number(owner, "server_lr", server_lr, 0, low_open=True)
        self.max_staleness = check_int(owner, "max_staleness", max_staleness, 0, optional=True)
        self.params: ParamDict = {}
        self.version = 0
        self.counters: dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        self.last_seq: dict[int, int] = {}
        self.staleness_hist: dict[int, int] = {}
        self.participation: dict[int, int] = {}
        self.outstanding: dict[int, int] = {}
        self.clock = 0.0
        #: FedProx μ (FedAsync ρ) that clients add to their local loss; 0 for rules without a proximal term.
        self.prox_mu = 0.0

    # ------------------------------------------------------------------ model
    def init_params(self, params: Mapping[str, Tensor]) -> None:
        """Set the global model (float32 CPU copies). Call once before the first :meth:`receive`."""
        self.params = {k: v.detach().to("cpu", torch.float32).clone() for k, v in params.items()}

    def global_params(self) -> ParamDict:
        """A copy of the current global model (what a client downloads)."""
        return {k: v.clone() for k, v in self.params.items()}

    def dispatch(self, client_id: int) -> tuple[ParamDict, int]:
        """A client downloads the global model: returns ``(params copy, version)`` and remembers the version."""
        self.outstanding[int(client_id)] = self.version
        self._on_dispatch(int(client_id))
        return self.global_params(), self.version

    def _on_dispatch(self, client_id: int) -> None:
        pass

    def _add_to_params(self, step: Mapping[str, Tensor], scale: float) -> None:
        for k, p in self.params.items():
            p.add_(step[k], alpha=scale)

    def _bump(self, n_applied: int) -> None:
        self.version += 1
        self.counters["updates_applied_total"] += n_applied

    # ---------------------------------------------------------------- receive
    def receive(
        self, client_id: int, delta: Mapping[str, Tensor], base_version: int, now: float = 0.0,
        update_seq: int | None = None,
    ) -> bool:
        """Offer one client delta to the rule. Returns True when it was accepted (it will be applied exactly once).

        Rejected (returns False, counted): a repeated or older ``update_seq`` of the same client
        (``duplicate_skipped_total``), a non-finite delta (``nonfinite_skipped_total``), an update staler than
        ``max_staleness`` or, for round-based rules, from another round (``stale_rejected_total``).
        """
        if not self.params:
            raise RuntimeError(f"{type(self).__name__}: call `init_params` before `receive`.")
        self.advance(now, inclusive=False)
        self.outstanding.pop(int(client_id), None)
        self.counters["updates_received_total"] += 1
        cid = int(client_id)
        last = self.last_seq.get(cid, -1)
        seq = last + 1 if update_seq is None else int(update_seq)
        if seq <= last:
            self.counters["duplicate_skipped_total"] += 1
            return False
        self.last_seq[cid] = seq
        self._check_delta(delta)
        if not all_finite(list(delta.values())):
            self.counters["nonfinite_skipped_total"] += 1
            return False
        if base_version > self.version or base_version < 0:
            raise argument_error(type(self).__name__, "base_version", f"in [0, {self.version}]", base_version)
        staleness = self.version - int(base_version)
        if (self.max_staleness is not None and staleness > self.max_staleness) or not self._admissible(
            cid, staleness
        ):
            self.counters["stale_rejected_total"] += 1
            return False
        delta32 = {k: v.detach().to("cpu", torch.float32) for k, v in delta.items()}
        self.counters["updates_accepted_total"] += 1
        self.staleness_hist[staleness] = self.staleness_hist.get(staleness, 0) + 1
        self.participation[cid] = self.participation.get(cid, 0) + 1
        self._accept(cid, delta32, staleness, float(now))
        return True

    def _check_delta(self, delta: Mapping[str, Tensor]) -> None:
        if set(delta) != set(self.params):
            raise ValueError(
                f"{type(self).__name__}: `delta` names must equal the global model's, got extra "
                f"{sorted(set(delta) - set(self.params))} and missing {sorted(set(self.params) - set(delta))}."
            )
        for k, v in delta.items():
            if v.shape != self.params[k].shape:
                raise ValueError(
                    f"{type(self).__name__}: `delta[{k!r}]` must have shape {tuple(self.params[k].shape)}, "
                    f"got {tuple(v.shape)}."
                )

    def _admissible(self, client_id: int, staleness: int) -> bool:
        return True

    def _accept(self, client_id: int, delta: ParamDict, staleness: int, now: float) -> None:  # pragma: no cover
        raise NotImplementedError

    # ------------------------------------------------------------ time/rounds
    def advance(self, now: float, inclusive: bool = True) -> int:
        """Let time pass (windowed rules aggregate here). Returns the number of aggregations done."""
        self.clock = max(self.clock, float(now))
        return 0

    def begin_round(self, participants: Iterable[int]) -> None:
        """Round-based rules: the clients expected in the current round. Others ignore it."""

    def close_round(self, now: float = 0.0) -> bool:
        """Round-based rules: aggregate whatever arrived (a timeout). Returns True if the model changed."""
        return False

    @property
    def pending(self) -> int:
        """Accepted updates not yet folded into the global model."""
        return self.counters["updates_accepted_total"] - self.counters["updates_applied_total"]

    # ---------------------------------------------------------------- metrics
    def metrics(self, log_per_item: bool = False) -> dict[str, float]:
        """Scalars for ``convergence/fl/...`` (names without the prefix)."""
        n = sum(self.staleness_hist.values())
        mean = sum(s * c for s, c in self.staleness_hist.items()) / n if n else 0.0
        out: dict[str, float] = {"staleness_steps": mean, "version": float(self.version),
                                 "updates_pending": float(self.pending)}
        out.update({k: float(v) for k, v in self.counters.items()})
        if log_per_item:
            out.update({f"participation/client{c}": float(v) for c, v in sorted(self.participation.items())})
        return out

    def staleness_counts(self) -> dict[str, float]:
        """The staleness histogram as ``staleness_count/<τ>`` scalars (logged once, at the end of a run)."""
        return {f"staleness_count/{s}": float(c) for s, c in sorted(self.staleness_hist.items())}

    # ------------------------------------------------------------------ state
    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, state: dict) -> None:
        pass

    def state_dict(self) -> dict:
        """Tensors and Python scalars only (loadable with ``torch.load(weights_only=True)``)."""
        return {
            "version": self.STATE_VERSION, "rule": self.name, "model_version": self.version,
            "params": {k: v.clone() for k, v in self.params.items()},
            "counters": dict(self.counters), "last_seq": dict(self.last_seq),
            "staleness_hist": dict(self.staleness_hist), "participation": dict(self.participation),
            "outstanding": dict(self.outstanding), "clock": float(self.clock),
            "extra": self._extra_state(), "hparams": {"server_lr": self.server_lr},
        }

    def load_state_dict(self, state: Mapping) -> None:
        owner = type(self).__name__
        check_state_version(owner, state, self.STATE_VERSION)
        if state.get("rule") != self.name:
            raise RuntimeError(f"{owner}: state was written by rule {state.get('rule')!r}, not {self.name!r}.")
        self.params = {k: v.detach().to("cpu", torch.float32).clone() for k, v in state["params"].items()}
        self.version = int(state["model_version"])
        self.counters = {k: int(state["counters"].get(k, 0)) for k in _COUNTERS}
        self.last_seq = {int(k): int(v) for k, v in state["last_seq"].items()}
        self.staleness_hist = {int(k): int(v) for k, v in state["staleness_hist"].items()}
        self.participation = {int(k): int(v) for k, v in state["participation"].items()}
        self.outstanding = {int(k): int(v) for k, v in state["outstanding"].items()}
        self.clock = float(state["clock"])
        self._load_extra_state(state["extra"])


def weighted_sum(deltas: Mapping[int, ParamDict], weights: Mapping[int, float]) -> ParamDict:
    """Σ_i w_i Δ_i, summed in client-id order so the result does not depend on arrival order."""
    ids = sorted(deltas)
    first = deltas[ids[0]]
    out = {k: torch.zeros_like(v) for k, v in first.items()}
    for i in ids:
        for k, v in deltas[i].items():
            out[k].add_(v, alpha=float(weights[i]))
    return out
