"""The federated server loop for real processes (rank 0), torch only: it drives a :class:`ServerRule` with clients
reached through a :class:`~lightning_convergence.federated.transport.ServerTransport`.

Asynchronous rules (FedAsync, FedBuff) hand a finished client its next model at once; FedFix hands it out at the next
window boundary; round-based rules (FedAvg, FedProx, FedAU) start a round with the idle live participants and close
it when every participant reported or died, or after ``round_timeout_s``. The server only ever waits on its queue with
a timeout, so a crashed or stalled client never blocks it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence

from lightning_convergence._checks import argument_error
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
            raise argument_error("FederatedServer", "event_order", "None with a synchronous rule", type(rule).__name__)
        if event_order is not None and transport.num_client_ranks != transport.num_clients:
            raise ValueError(f"FederatedServer: `event_order` needs one client per rank, got "
                             f"{transport.num_clients} clients on {transport.num_client_ranks} ranks.")
        if participation is not None and not rule.round_based:
            raise argument_error("FederatedServer", "participation", "None with a rule that is not round-based",
                                 type(rule).__name__)
        self.rule, self.transport, self.participation = rule, transport, participation
        self.round_timeout_s, self.poll_s = float(round_timeout_s), float(poll_s)
        self.event_order = None if event_order is None else [int(c) for c in event_order]
        state = state or {}
        self.round_idx = int(state.get("round_idx", 0))
        self.order_pos = int(state.get("order_pos", 0))
        self._time_offset = float(state.get("clock", rule.clock))
        self.num_clients = transport.num_clients
        self.next_seq = {c: rule.last_seq.get(c, -1) + 1 for c in range(self.num_clients)}
        self.busy: set[int] = set()  # clients with a task sent or queued for their rank
        self.waiting: set[int] = set()
        self.held: dict[int, Message] = {}
        self.members: set[int] = set()
        self.reported: set[int] = set()
        self._rank_busy: set[int] = set()  # ranks that hold a task (a send to them could wait behind training)
        self._rank_queue: dict[int, deque[int]] = {}
        self._round_start = 0.0
        self._round_open = False
        self._rounds_at_start = 0
        self.recent_losses: list[float] = []
        self.discarded_total = 0
        self.client_nonfinite_steps_total = 0
        self.deaths: dict[int, str] = {}
        self.stalled_ranks: set[int] = set()
        self._t0 = time.monotonic()

    # ------------------------------------------------------------------ basics
    def now(self) -> float:
        return self._time_offset + time.monotonic() - self._t0

    @property
    def alive(self) -> set[int]:
        return set(range(self.num_clients)) - self.transport.dead

    def _dispatch(self, cid: int) -> None:
        """Queue client ``cid``'s next task on its rank; the rank gets it as soon as it is idle."""
        rank = self.transport.rank_of(cid)
        if rank in self.transport.dead_ranks:
            return
        self.busy.add(cid)
        self._rank_queue.setdefault(rank, deque()).append(cid)
        self._pump(rank)

    def _pump(self, rank: int) -> None:
        queued = self._rank_queue.get(rank)
        if rank in self._rank_busy or not queued:
            return
        cid = queued.popleft()
        params, version = self.rule.dispatch(cid)  # the model is taken when the rank can start on it
        seq = self.next_seq[cid]
        if self.transport.send(rank, TASK, cid, [version, seq], params):
            self.next_seq[cid] = seq + 1
            self._rank_busy.add(rank)
        else:
            self._rank_died(rank, "send failed")

    def _rank_died(self, rank: int, why: str) -> None:
        self.transport.dead_ranks.add(rank)
        self._rank_busy.discard(rank)
        self._rank_queue.pop(rank, None)
        for cid in range(self.num_clients):
            if self.transport.rank_of(cid) == rank:
                self.busy.discard(cid)
                self.waiting.discard(cid)
                self.deaths.setdefault(cid, f"rank {rank}: {why}")

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
            self._rank_died(msg.rank, msg.error)
            return
        if msg.kind != UPDATE:
            return
        self._rank_busy.discard(msg.rank)
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
        self._pump(msg.rank)

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
            self.held[msg.client_id] = msg  # one client per rank here (checked at construction)
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
        """Stop every client rank. Updates still arriving are discarded (never accepted). Returns the ranks that did
        not acknowledge in time (stalled): the caller may end their processes if it started them."""
        for rank in self._rank_queue:
            for cid in self._rank_queue[rank]:
                self.busy.discard(cid)
        self._rank_queue.clear()
        live = set(range(1, self.transport.num_client_ranks + 1)) - self.transport.dead_ranks
        for rank in sorted(live - self._rank_busy):
            self.transport.send(rank, STOP, -1, [], None)
        stopped: set[int] = set()
        deadline = time.monotonic() + timeout_s
        while live - stopped - self.transport.dead_ranks and time.monotonic() < deadline:
            msg = self.transport.poll(self.poll_s)
            if msg is None:
                continue
            if msg.kind == 0:
                self._rank_died(msg.rank, msg.error)
            elif msg.kind == UPDATE:
                self.discarded_total += 1
                self.busy.discard(msg.client_id)
                self._rank_busy.discard(msg.rank)
                self.transport.send(msg.rank, STOP, -1, [], None)
            elif msg.kind == STOP:
                stopped.add(msg.rank)
        for msg in self.held.values():
            if msg.kind == UPDATE:
                self.discarded_total += 1
        self.stalled_ranks = live - stopped - self.transport.dead_ranks
        return set(self.stalled_ranks)

    def report(self) -> str:
        """One line on who dropped out (died or stalled) and what was discarded; empty if nobody did."""
        parts = []
        if self.deaths:
            parts.append("clients lost: " + ", ".join(f"{c} ({why})" for c, why in sorted(self.deaths.items())))
        if self.stalled_ranks:
            parts.append(f"ranks that did not acknowledge STOP (stalled): {sorted(self.stalled_ranks)}")
        if parts and self.discarded_total:
            parts.append(f"{self.discarded_total} late updates discarded")
        return "; ".join(parts)

    def state_dict(self) -> dict:
        return {"round_idx": self.round_idx, "order_pos": self.order_pos, "clock": self.now()}

    def metrics(self) -> dict[str, float]:
        p2p = self.transport.p2p
        return {"clients_alive": float(len(self.alive)), "clients_dropped_total": float(len(self.deaths)),
                "updates_discarded_total": float(self.discarded_total),
                "client_nonfinite_steps_total": float(self.client_nonfinite_steps_total),
                "bytes_sent_total": float(p2p.bytes_sent_total),
                "bytes_received_total": float(p2p.bytes_received_total)}
