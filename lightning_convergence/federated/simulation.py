"""Simulation mode: hundreds of virtual clients multiplexed over one process on a virtual clock.

Each client runs K local steps of the user's unchanged ``training_step`` (see :func:`~.client.local_train`); its
update arrives at ``start + K·speed_n`` virtual time units. Events are processed in (time, client id) order, so a run
is a deterministic function of its seeds. The real-process runner
(:class:`~lightning_convergence.strategies.async_fl.AsyncFederatedStrategy`) uses the same client code and rules, so
the two give the same trajectory for the same event order (``event_order``).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from typing import Any

from lightning_convergence._checks import argument_error, check_int, check_numbers
from lightning_convergence.federated.base import ParamDict, ServerRule
from lightning_convergence.federated.client import ClientStream, local_train, module_params
from lightning_convergence.federated.partition import Participation

__all__ = ["FederatedSimulation"]


class FederatedSimulation:
    """Run a federated server rule with many virtual clients in one process, on a virtual clock.

    Paper:
        Event-driven simulation of the asynchronous settings of FedBuff (arXiv:2106.06639), FedAsync
        (arXiv:1903.03934) and FedFix (arXiv:2206.10189); rounds for FedAvg / FedProx / FedAU.

    Deviations:
        No ``Trainer`` runs per client: a manual loop calls ``training_step``, ``backward`` and the first optimizer of
        ``configure_optimizers`` (rebuilt every local round, as in FedAvg; LR schedulers, gradient clipping,
        accumulation and Lightning hooks are not applied on clients). Only trainable parameters are federated
        (buffers such as BatchNorm statistics stay as the module holds them). A client's update is computed when it
        starts (from the model it downloaded), which is equivalent to computing it when it arrives.

    Args:
        module: the user's model (LightningModule or any ``nn.Module`` with ``training_step`` and
            ``configure_optimizers``); its current parameters are the initial global model.
        rule: a :class:`~lightning_convergence.federated.base.ServerRule`.
        streams: one :class:`~.client.ClientStream` per client.
        local_steps: K, local optimizer steps per update, ≥ 1. Default ``5``.
        speeds: virtual time per local step for each client (≥ 0). Default all ``1.0``.
        participation: round-based rules only: who takes part in each round. Default everyone.
        eval_fn: ``eval_fn(params) -> {name: value}`` on the global model; called every ``check_every_n_steps``
            server steps (versions).
        check_every_n_steps: server steps (versions) between evaluations, ≥ 1. Default ``1``.
        log_per_item: also record per-client participation. Default ``False``.

    State:
        The rule holds the model state; the simulation's own state (streams, virtual clock) is rebuilt per run.

    Logs:
        Nothing itself (a core): :attr:`metric_rows` holds ``(version, metrics)`` for each evaluated version (the
        rule's ``convergence/fl/*`` metrics, ``virtual_time`` and ``val_<name>`` for each ``eval_fn`` output) and,
        last, the ``staleness_count/<τ>`` histogram; ``strategies.async_fl.log_simulation(trainer, sim)`` writes
        them through a trainer's loggers.

    Raises:
        TypeError: for a non-int ``local_steps`` or ``check_every_n_steps``, or non-number ``speeds``.
        ValueError: for mismatched ``streams``/``speeds``/``participation`` lengths, ``local_steps`` < 1, a
            ``participation`` given to a non-round rule, or ``event_order`` with a non-asynchronous rule.

    Example:
        >>> # sim = FederatedSimulation(model, FedBuff(buffer_size=4), streams, local_steps=5, speeds=[1, 2, 5, 10])
        >>> # history = sim.run(max_versions=100)
    """

    def __init__(
        self, module: Any, rule: ServerRule, streams: Sequence[ClientStream], local_steps: int = 5,
        speeds: Sequence[float] | None = None, participation: Participation | None = None,
        eval_fn: Callable[[ParamDict], dict[str, float]] | None = None, check_every_n_steps: int = 1,
        log_per_item: bool = False,
    ) -> None:
        owner, n = "FederatedSimulation", len(streams)
        if n < 1:
            raise argument_error(owner, "streams", "at least one client's stream", [])
        check_int(owner, "local_steps", local_steps, 1)
        speeds = [1.0] * n if speeds is None else check_numbers(owner, "speeds", list(speeds), n, 0)
        if participation is not None:
            if not rule.round_based:
                raise argument_error(owner, "participation", "None with a rule that is not round-based (use FedAvg, "
                                     "FedProx or FedAU)", type(rule).__name__)
            if participation.num_clients != n:
                raise argument_error(owner, "participation", f"a Participation of {n} clients",
                                     f"{participation.num_clients} clients")
        check_int(owner, "check_every_n_steps", check_every_n_steps, 1)
        self.module, self.rule, self.streams = module, rule, list(streams)
        self.local_steps, self.speeds, self.participation = local_steps, speeds, participation
        self.eval_fn, self.check_every_n_steps, self.log_per_item = eval_fn, check_every_n_steps, log_per_item
        self.history: list[dict[str, float]] = []
        self.metric_rows: list[tuple[int, dict[str, float]]] = []
        self.events: list[tuple[float, int, int, bool]] = []
        self.time = 0.0
        self._seq = [0] * n
        self._last_eval = -1

    # ------------------------------------------------------------------ helpers
    def _train(self, cid: int) -> tuple[ParamDict, int, int]:
        params, version = self.rule.dispatch(cid)
        delta, _, _ = local_train(self.module, params, self.streams[cid], self.local_steps, self.rule.prox_mu)
        seq = self._seq[cid]
        self._seq[cid] += 1
        return delta, version, seq

    def _deliver(self, cid: int, delta: ParamDict, base: int, seq: int) -> bool:
        ok = self.rule.receive(cid, delta, base, now=self.time, update_seq=seq)
        self.events.append((self.time, cid, base, ok))
        return ok

    def _record(self, force: bool = False) -> None:
        v = self.rule.version
        if v == self._last_eval or (not force and v % self.check_every_n_steps != 0):
            return
        self._last_eval = v
        row = {"version": float(v), "time": self.time,
               "updates_applied_total": float(self.rule.counters["updates_applied_total"])}
        if self.eval_fn is not None:
            row.update({k: float(x) for k, x in self.eval_fn(self.rule.global_params()).items()})
        self.history.append(row)
        metrics = self.rule.metrics(self.log_per_item)
        metrics["virtual_time"] = self.time
        metrics.update({f"val_{k}": x for k, x in row.items() if k not in ("version", "time", "updates_applied_total")})
        self.metric_rows.append((v, metrics))

    def _done(self, max_versions: int | None, max_time: float | None, stop: Callable | None) -> bool:
        if max_versions is not None and self.rule.version >= max_versions:
            return True
        if max_time is not None and self.time >= max_time:
            return True
        return bool(stop is not None and self.history and stop(self.history[-1]))

    # ---------------------------------------------------------------------- run
    def run(
        self, max_versions: int | None = None, max_time: float | None = None,
        event_order: Sequence[int] | None = None,
        stop: Callable[[dict[str, float]], bool] | None = None, max_rounds: int = 1_000_000,
    ) -> list[dict[str, float]]:
        """Simulate until ``max_versions`` server updates, virtual time ``max_time``, or ``stop(last_row)``.

        ``event_order`` (asynchronous rules only) forces the order in which client updates arrive, one client id per
        arrival, ignoring speeds. Returns :attr:`history` (one row per evaluated version); :attr:`metric_rows` gets
        the metrics of the same versions and, last, the staleness histogram.
        """
        if max_versions is None and max_time is None and event_order is None and stop is None:
            raise ValueError("FederatedSimulation.run: give `max_versions`, `max_time`, `event_order` or `stop`.")
        if not self.rule.params:
            self.rule.init_params(module_params(self.module))
        self._record(force=True)
        if self.rule.round_based:
            self._run_rounds(max_versions, max_time, stop, max_rounds)
        elif event_order is not None:
            if self.rule.synchronous:
                raise ValueError("FederatedSimulation.run: `event_order` needs an asynchronous rule "
                                 f"(FedAsync, FedBuff), got {type(self.rule).__name__}.")
            self._run_ordered(event_order)
        else:
            self._run_events(max_versions, max_time, stop)
        self._record(force=True)
        if self.rule.staleness_hist:
            self.metric_rows.append((self.rule.version, self.rule.staleness_counts()))
        return self.history

    def _run_rounds(self, max_versions, max_time, stop, max_rounds) -> None:
        r = 0
        while not self._done(max_versions, max_time, stop) and r < max_rounds:
            ids = self.participation.participants(r) if self.participation else list(range(len(self.streams)))
            self.rule.begin_round(ids)
            rounds0 = self.rule.rounds_total
            for cid in ids:
                delta, base, seq = self._train(cid)
                self._deliver(cid, delta, base, seq)
            self.time += max((self.local_steps * self.speeds[c] for c in ids), default=0.0)
            if self.rule.rounds_total == rounds0:  # nobody came, or a rejected update left the round open
                self.rule.close_round(self.time)
            r += 1
            self._record()

    def _run_ordered(self, order: Sequence[int]) -> None:
        inflight = {cid: self._train(cid) for cid in range(len(self.streams))}
        for step, cid in enumerate(order):
            self.time = float(step + 1)
            self._deliver(cid, *inflight.pop(cid))
            inflight[cid] = self._train(cid)
            self._record()

    def _run_events(self, max_versions, max_time, stop) -> None:
        heap: list[tuple[float, int, int]] = []  # (time, kind 0=client 1=window boundary, client id)
        inflight: dict[int, tuple[ParamDict, int, int]] = {}
        windowed = self.rule.synchronous  # FedFix: clients restart only at aggregation times

        def start(cid: int) -> None:
            inflight[cid] = self._train(cid)
            heapq.heappush(heap, (self.time + self.local_steps * self.speeds[cid], 0, cid))

        for cid in range(len(self.streams)):
            start(cid)
        waiting: list[int] = []
        if windowed:
            heapq.heappush(heap, (self.rule.next_boundary(), 1, -1))
        while heap and not self._done(max_versions, max_time, stop):
            t, kind, cid = heapq.heappop(heap)
            self.time = t
            if kind == 0:
                arrived = [cid]  # simultaneous arrivals are all delivered before any of them downloads again
                while heap and heap[0][0] == t and heap[0][1] == 0:
                    arrived.append(heapq.heappop(heap)[2])
                for c in arrived:
                    self._deliver(c, *inflight.pop(c))
                if windowed:
                    waiting.extend(arrived)
                else:
                    for c in arrived:
                        start(c)
            else:
                self.rule.advance(t)
                for c in sorted(waiting):
                    start(c)
                waiting.clear()
                heapq.heappush(heap, (self.rule.next_boundary(), 1, -1))
            self._record()
