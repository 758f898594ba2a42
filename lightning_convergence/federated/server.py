"""The federated server loop for real processes (rank 0), torch only: it drives a :class:`ServerRule` with clients
reached through a :class:`~lightning_convergence.federated.transport.ServerTransport`.

Asynchronous rules (FedAsync, FedBuff) hand a finished client its next model at once; FedFix hands it out at the next
window boundary; round-based rules (FedAvg, FedProx, FedAU) start a round with the idle live participants and close
it when every participant reported or died, or after ``round_timeout_s``. The server only ever waits on its queue with
a timeout, so a crashed or stalled client never blocks it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from lightning_convergence.federated.base import ServerRule
from lightning_convergence.federated.partition import Participation
from lightning_convergence.federated.transport import STOP, TASK, UPDATE, Message, ServerTransport

__all__ = ["FederatedServer"]


class FederatedServer:
    """Rank 0's event loop over real clients.

    Args:
        rule: the server rule (already holding the initial or restored global model).
        transport: the started-or-not :class:`ServerTransport`.
        participation: round-based rules only; who is asked to take part in each round. Default everyone.
        round_timeout_s: round-based rules: close a round after this many seconds, > 0. Default ``30.0``.
        poll_s: how long one wait on the queue lasts (also the FedFix clock resolution). Default ``0.01``.
        event_order: asynchronous rules only: process arrivals in this order of client ids (for equivalence tests).
        state: what :meth:`state_dict` returned before, to resume (round index, order position, clock).

    Raises:
        ValueError: ``event_order`` with a synchronous rule, or ``participation`` with a non-round rule.
    """

    def __init__(
        self, rule: ServerRule, transport: ServerTransport, participation: Participation | None = None,
        round_timeout_s: float = 30.0, poll_s: float = 0.01, event_order: Sequence[int] | None = None,
        state: dict | None = None,
    ) -> None:
        if event_order is not None and rule.synchronous:
            raise ValueError(f"FederatedServer: `event_order` needs an asynchronous rule, got {type(rule).__name__}.")
        if participation is not None and not rule.round_based:
            raise ValueError(f"FederatedServer: `participation` needs a round-based rule, got {type(rule).__name__}.")
        self.rule, self.transport, self.participation = rule, transport, participation
        self.round_timeout_s, self.poll_s = float(round_timeout_s), float(poll_s)
        self.event_order = None if event_order is None else [int(c) for c in event_order]
        state = state or {}
        self.round_idx = int(state.get("round_idx", 0))
        self.order_pos = int(state.get("order_pos", 0))
        self._time_offset = float(state.get("clock", rule.clock))
        self.num_clients = transport.num_clients
        self.next_seq = {c: rule.last_seq.get(c, -1) + 1 for c in range(self.num_clients)}
        self.busy: set[int] = set()
        self.waiting: set[int] = set()
        self.held: dict[int, Message] = {}
        self.members: set[int] = set()
        self.reported: set[int] = set()
        self._round_start = 0.0
        self._round_open = False
        self._rounds_at_start = 0
        self.recent_losses: list[float] = []
        self.discarded_total = 0
        self.client_nonfinite_steps_total = 0
        self.deaths: dict[int, str] = {}
        self._t0 = time.monotonic()

    # ------------------------------------------------------------------ basics
    def now(self) -> float:
        return self._time_offset + time.monotonic() - self._t0

    @property
    def alive(self) -> set[int]:
        return set(range(self.num_clients)) - self.transport.dead

    def _dispatch(self, cid: int) -> None:
        params, version = self.rule.dispatch(cid)
        seq = self.next_seq[cid]
        if self.transport.send(cid, TASK, [version, seq], params):
            self.next_seq[cid] = seq + 1
            self.busy.add(cid)
        else:
            self._died(cid, "send failed")

    def _died(self, cid: int, why: str) -> None:
        self.transport.dead.add(cid)
        self.busy.discard(cid)
        self.waiting.discard(cid)
        self.deaths.setdefault(cid, why)

    def start(self) -> None:
        """Start the receiver threads and hand out the first tasks."""
        self.transport.start()
        self._t0 = time.monotonic()
        if self.rule.round_based:
            self._begin_round()
        else:
            for cid in range(self.num_clients):
                self._dispatch(cid)

    # ------------------------------------------------------------------ rounds
    def _begin_round(self) -> None:
        self._round_open = False
        if not self.alive - self.busy:  # every live client is still busy (stragglers): wait for one to come back
            return
        for _ in range(10_000):  # skip rounds nobody can join (empty Bernoulli draws) without recursion
            ids = self.participation.participants(self.round_idx) if self.participation else range(self.num_clients)
            ids = [c for c in ids if c in self.alive and c not in self.busy]
            self.rule.begin_round(ids)
            self._round_open = True
            self.members, self.reported = set(ids), set()
            self._round_start, self._rounds_at_start = self.now(), self.rule.rounds_total
            if ids or not self.alive:
                for cid in ids:
                    self._dispatch(cid)
                return
            self.rule.close_round(self.now())
            self.round_idx += 1

    def _check_round(self) -> None:
        if not self._round_open:
            if self.alive - self.busy:
                self._begin_round()
            return
        done = self.members <= (self.reported | self.transport.dead)
        timed_out = self.now() - self._round_start > self.round_timeout_s
        if not (done or timed_out):
            return
        if self.rule.rounds_total == self._rounds_at_start:
            self.rule.close_round(self.now())
        self.round_idx += 1
        self._begin_round()

    # ------------------------------------------------------------------- serve
    def _handle(self, msg: Message) -> None:
        cid = msg.client_id
        if msg.kind == 0:
            self._died(cid, msg.error)
            return
        if msg.kind != UPDATE:
            return
        self.busy.discard(cid)
        version, seq, loss = int(msg.header[0]), int(msg.header[1]), msg.header[2]
        self.client_nonfinite_steps_total += int(msg.header[3])  # local steps the client skipped (non-finite grads)
        self.rule.receive(cid, msg.delta, version, now=self.now(), update_seq=seq)
        self.recent_losses.append(loss)
        if self.rule.round_based:
            if cid in self.members:
                self.reported.add(cid)
        elif self.rule.synchronous:
            self.waiting.add(cid)
        else:
            self._dispatch(cid)

    def _next_message(self) -> Message | None:
        if self.event_order is None:
            return self.transport.poll(self.poll_s)
        if self.order_pos >= len(self.event_order):
            return None
        want = self.event_order[self.order_pos]
        while want not in self.held:
            msg = self.transport.poll(self.poll_s)
            if msg is None:
                return None
            if msg.kind == 0:
                return msg
            self.held[msg.client_id] = msg
        self.order_pos += 1
        return self.held.pop(want)

    def serve_until(self, target_version: int, timeout_s: float | None = None) -> bool:
        """Process events until ``rule.version >= target_version``. False if that became impossible or timed out."""
        start = time.monotonic()
        while self.rule.version < target_version:
            if not self.alive and not self.held:
                return False
            if self.event_order is not None and self.order_pos >= len(self.event_order) and not self.held:
                return False
            if timeout_s is not None and time.monotonic() - start > timeout_s:
                return False
            if self.rule.synchronous and not self.rule.round_based and self.rule.advance(self.now()):
                for cid in sorted(self.waiting):
                    self._dispatch(cid)
                self.waiting.clear()
            msg = self._next_message()
            if msg is not None:
                self._handle(msg)
            if self.rule.round_based:
                self._check_round()
        return True

    def pop_losses(self) -> list[float]:
        out, self.recent_losses = self.recent_losses, []
        return out

    # ---------------------------------------------------------------- shutdown
    def shutdown(self, timeout_s: float = 10.0) -> set[int]:
        """Stop every client. Updates still arriving are discarded (never accepted). Returns clients that did not
        acknowledge in time (stalled): the caller may kill their processes."""
        stopped: set[int] = set()
        for cid in sorted(self.alive - self.busy):
            self.transport.send(cid, STOP, [], None)
        deadline = time.monotonic() + timeout_s
        pending = set(self.alive)
        while pending - stopped and time.monotonic() < deadline:
            msg = self.transport.poll(self.poll_s)
            if msg is None:
                continue
            if msg.kind == 0:
                self._died(msg.client_id, msg.error)
                pending.discard(msg.client_id)
            elif msg.kind == UPDATE:
                self.discarded_total += 1
                self.busy.discard(msg.client_id)
                self.transport.send(msg.client_id, STOP, [], None)
            elif msg.kind == STOP:
                stopped.add(msg.client_id)
        for msg in self.held.values():
            if msg.kind == UPDATE:
                self.discarded_total += 1
        return pending - stopped

    def state_dict(self) -> dict:
        return {"round_idx": self.round_idx, "order_pos": self.order_pos, "clock": self.now()}

    def metrics(self) -> dict[str, float]:
        return {"clients_alive": float(len(self.alive)), "updates_discarded_total": float(self.discarded_total),
                "client_nonfinite_steps_total": float(self.client_nonfinite_steps_total)}
