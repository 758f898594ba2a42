"""Point-to-point transport between the federated server (rank 0) and client ranks, torch only.

Rank 0 is the server; ranks 1..R are *client ranks*, and client ``c`` lives on rank ``1 + c % R`` (one client per
rank when R = N, several clients served in turn by one rank when N > R). Every transfer is ONE message: a float32
tensor whose first ``2·_HEADER`` slots hold ``_HEADER`` float64 header values ``[kind, client_id, a, b, c, d, e, f]``
(exact integers below 2^53) followed by the flat float32 parameters. One message per transfer means a client that
dies mid-send never leaves half a message behind.

The point-to-point primitives are passed in (:class:`P2P`: a ``send(tensor, dst)`` and a ``recv(tensor, src)``
callable) and every byte they move is counted here, so the functions can move into a shared communication layer
unchanged; :func:`torch_p2p` builds them over ``torch.distributed`` (gloo). Link bytes are the bytes this rank sends
(:func:`~lightning_convergence.comm.links.point_to_point_link_bytes`: no algorithm factor), ``message_nbytes(layout)``
per message.

Why point-to-point and not ``torch.distributed.rpc``: gloo send/recv exists in every torch build (CPU and CUDA), while
RPC (TensorPipe) is in maintenance mode and absent from some builds. Why one receiver thread per client rank instead
of an ``irecv``/``is_completed`` polling loop: on gloo, ``Work.is_completed()`` of a pending ``irecv`` does not turn
true before ``wait()`` is called (checked with torch 2.13), so polling cannot observe arrivals; a blocking ``recv`` in a
daemon thread per rank feeds one queue that the server polls with a timeout. A crashed rank makes its thread's
``recv`` raise ("Connection closed by peer"), which is reported as a death; a stalled rank only leaves its thread
waiting — the server never waits on any one rank. The server sends a rank a task only when the rank is idle (has
posted its ``recv``), so a send never waits behind a rank's training.
"""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_convergence.comm.links import point_to_point_link_bytes
from lightning_convergence.federated.base import ParamDict

__all__ = [
    "TASK", "STOP", "UPDATE", "P2P", "ParamLayout", "ServerTransport", "Message", "ClientFault", "ClientWork",
    "torch_p2p", "rank_of_client", "clients_of_rank", "message_nbytes", "serve_clients",
]

TASK, STOP, UPDATE = 1, 2, 3
_HEADER = 8  # float64 header values; they occupy 2·_HEADER float32 slots


def rank_of_client(client_id: int, num_client_ranks: int) -> int:
    """The rank that serves client ``client_id`` when ``num_client_ranks`` ranks (1..R) serve the clients."""
    return 1 + int(client_id) % int(num_client_ranks)


def clients_of_rank(rank: int, num_clients: int, num_client_ranks: int) -> list[int]:
    """The client ids served by ``rank`` (≥ 1), in increasing order."""
    return [c for c in range(num_clients) if rank_of_client(c, num_client_ranks) == rank]


@dataclass
class P2P:
    """Point-to-point primitives and their link-byte counters (bytes this rank sent and received).

    Args:
        send: ``send(tensor, dst_rank)``, blocking until the tensor is handed to the link.
        recv: ``recv(tensor, src_rank)``, filling ``tensor`` in place.
    """

    send: Callable[[Tensor, int], Any]
    recv: Callable[[Tensor, int], Any]
    bytes_sent_total: int = 0
    bytes_received_total: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def send_message(self, msg: Tensor, dst: int) -> None:
        self.send(msg, dst)
        with self._lock:
            self.bytes_sent_total += point_to_point_link_bytes(msg.numel() * msg.element_size())

    def recv_message(self, buf: Tensor, src: int) -> None:
        self.recv(buf, src)
        with self._lock:
            self.bytes_received_total += point_to_point_link_bytes(buf.numel() * buf.element_size())


def torch_p2p(group: Any = None) -> P2P:
    """:class:`P2P` over ``torch.distributed.send``/``recv`` (global ranks) on ``group`` (default group if None)."""
    return P2P(send=lambda t, dst: dist.send(t, dst=dst, group=group),
               recv=lambda t, src: dist.recv(t, src=src, group=group))


class ParamLayout:
    """Names and shapes of the federated parameters, to flatten a ``{name: tensor}`` dict into a message and back."""

    def __init__(self, params: Mapping[str, Tensor]) -> None:
        self.names = list(params)
        self.shapes = [tuple(params[n].shape) for n in self.names]
        self.numels = [int(params[n].numel()) for n in self.names]
        self.numel = sum(self.numels)

    def empty(self) -> Tensor:
        return torch.zeros(2 * _HEADER + self.numel, dtype=torch.float32)

    def pack(self, kind: int, client_id: int, header: Sequence[float], params: Mapping[str, Tensor] | None) -> Tensor:
        msg = self.empty()
        head = [float(kind), float(client_id), *(float(v) for v in header[: _HEADER - 2])]
        msg[: 2 * _HEADER].view(torch.float64)[: len(head)] = torch.tensor(head, dtype=torch.float64)
        if params is not None:
            torch.cat([params[n].detach().reshape(-1).to("cpu", torch.float32) for n in self.names],
                      out=msg[2 * _HEADER:])
        return msg

    def unpack(self, msg: Tensor) -> tuple[int, int, list[float], ParamDict]:
        """``(kind, client_id, header[6], params)`` of a received message (the params are views of ``msg``)."""
        head = msg[: 2 * _HEADER].view(torch.float64).tolist()  # once per message, not per training step
        flat = msg[2 * _HEADER:]
        parts = torch.split(flat, self.numels)
        out = {n: p.view(s) for n, s, p in zip(self.names, self.shapes, parts)}
        return int(head[0]), int(head[1]), head[2:], out


def message_nbytes(layout: ParamLayout) -> int:
    """Bytes one message puts on the link (header + float32 parameters)."""
    return (2 * _HEADER + layout.numel) * 4


@dataclass
class Message:
    """What the server's queue yields: an update (``kind == UPDATE``), an acknowledged STOP, or a rank's death
    (``kind == 0``, ``client_id == -1``)."""

    rank: int
    client_id: int
    kind: int
    header: list[float]
    delta: ParamDict | None
    error: str = ""


class ServerTransport:
    """Rank 0's side: one receiver thread per client rank feeding a queue; sends through :class:`P2P`.

    Args:
        layout: the parameter layout shared with the clients.
        num_clients: N clients.
        num_client_ranks: R client ranks (1..R); default N (one client per rank).
        p2p: the point-to-point primitives; default :func:`torch_p2p` on the default group.
    """

    def __init__(self, layout: ParamLayout, num_clients: int, num_client_ranks: int | None = None,
                 p2p: P2P | None = None) -> None:
        self.layout, self.num_clients = layout, num_clients
        self.num_client_ranks = num_clients if num_client_ranks is None else int(num_client_ranks)
        self.p2p = p2p or torch_p2p()
        self.queue: queue.Queue[Message] = queue.Queue()
        self.dead_ranks: set[int] = set()
        self._threads: list[threading.Thread] = []

    def rank_of(self, client_id: int) -> int:
        return rank_of_client(client_id, self.num_client_ranks)

    @property
    def dead(self) -> set[int]:
        """Client ids whose rank died."""
        return {c for c in range(self.num_clients) if self.rank_of(c) in self.dead_ranks}

    def start(self) -> None:
        for rank in range(1, self.num_client_ranks + 1):
            t = threading.Thread(target=self._receive_loop, args=(rank,), daemon=True, name=f"fl-recv-{rank}")
            t.start()
            self._threads.append(t)

    def _receive_loop(self, rank: int) -> None:
        while True:
            buf = self.layout.empty()
            try:
                self.p2p.recv_message(buf, rank)
            except Exception as err:  # the peer crashed or the group was torn down
                self.queue.put(Message(rank, -1, 0, [], None, (str(err).splitlines() or [""])[0][:200]))
                return
            kind, cid, header, delta = self.layout.unpack(buf)
            self.queue.put(Message(rank, cid, kind, header, delta))
            if kind == STOP:  # the rank acknowledged shutdown; nothing more will come
                return

    def poll(self, timeout_s: float) -> Message | None:
        try:
            return self.queue.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def send(self, rank: int, kind: int, client_id: int, header: Sequence[float],
             params: Mapping[str, Tensor] | None) -> bool:
        """Send one message to ``rank``; False (and the rank marked dead) if the connection is gone."""
        if rank in self.dead_ranks:
            return False
        try:
            self.p2p.send_message(self.layout.pack(kind, client_id, header, params), rank)
            return True
        except Exception:
            self.dead_ranks.add(rank)
            return False

    def join(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(timeout=max(deadline - time.monotonic(), 0.0))


@dataclass
class ClientFault:
    """Fault injection for tests: after ``after_updates`` sent updates the client's rank ``"crash"``es (exits),
    is ``"kill"``ed (SIGKILL, as a launcher or the OOM killer would) or ``"stall"``s (sleeps for an hour)."""

    kind: str
    after_updates: int


@dataclass
class ClientWork:
    """One client as served by its rank: its batch stream, emulated delay per local step and optional fault."""

    stream: Any
    step_delay_s: float = 0.0
    fault: ClientFault | None = None
    sent: int = 0


def _inject(fault: ClientFault | None, sent: int) -> None:
    if fault is None or sent < fault.after_updates:
        return
    if fault.kind == "crash":
        os._exit(17)
    if fault.kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(3600.0)  # stall: the server must not wait for us


def serve_clients(
    clients: Mapping[int, ClientWork], module: Any, layout: ParamLayout, local_steps: int, prox_mu: float,
    p2p: P2P, device: Any = None,
) -> int:
    """A client rank's whole life: receive a task for one of its clients, train K local steps, send the delta; until
    STOP. Returns the number of updates sent.

    The client's stream is positioned at ``seq·K`` batches before each task, so a client restarted after a server
    resume continues its data order exactly. ``device`` (default: where the module's parameters are) receives the
    batches.
    """
    from lightning_convergence.federated.client import local_train

    sent = 0
    while True:
        buf = layout.empty()
        p2p.recv_message(buf, 0)
        kind, cid, header, params = layout.unpack(buf)
        if kind == STOP:
            p2p.send_message(layout.pack(STOP, -1, [], None), 0)
            return sent
        work = clients[cid]
        version, seq = int(header[0]), int(header[1])
        work.stream.seek(seq * local_steps)
        delta, loss, nonfinite = local_train(module, params, work.stream, local_steps, prox_mu, device=device)
        if work.step_delay_s > 0:
            time.sleep(work.step_delay_s * local_steps)
        _inject(work.fault, work.sent)
        p2p.send_message(layout.pack(UPDATE, cid, [version, seq, loss, nonfinite], delta), 0)
        work.sent += 1
        sent += 1
