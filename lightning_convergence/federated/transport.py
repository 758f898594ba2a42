"""Point-to-point transport for real federated processes over ``torch.distributed`` (gloo), torch only.

Rank 0 is the server, ranks 1..N are clients (client id = rank − 1). Every message is ONE flat float64 tensor
``[kind, a, b, c, d, e, f, g, payload...]``: a single message per transfer means a client that dies mid-send can never
leave half a message behind, and float64 carries integer counters exactly (< 2^53) and float32 parameters exactly.

Why point-to-point and not ``torch.distributed.rpc``: gloo send/recv exists in every torch build (CPU and CUDA), while
RPC (TensorPipe) is in maintenance mode and absent from some builds. Why one receiver thread per client instead of an
``irecv``/``is_completed`` polling loop: on gloo, ``Work.is_completed()`` of a pending ``irecv`` does not turn true
before ``wait()`` is called (checked with torch 2.13), so polling cannot observe arrivals; a blocking ``recv`` in a
daemon thread per client feeds one queue that the server polls with a timeout. A crashed client makes its thread's
``recv`` raise ("Connection closed by peer"), which is reported as a death; a stalled client only leaves its thread
waiting — the server never waits on any one client.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_convergence.federated.base import ParamDict

__all__ = ["TASK", "STOP", "UPDATE", "ParamLayout", "ServerTransport", "Message", "run_client", "ClientFault"]

TASK, STOP, UPDATE = 1, 2, 3
_HEADER = 8


class ParamLayout:
    """Names and shapes of the federated parameters, to flatten a ``{name: tensor}`` dict and back."""

    def __init__(self, params: Mapping[str, Tensor]) -> None:
        self.names = list(params)
        self.shapes = [tuple(params[n].shape) for n in self.names]
        self.numels = [int(params[n].numel()) for n in self.names]
        self.numel = sum(self.numels)

    def pack(self, kind: int, header: Sequence[float], params: Mapping[str, Tensor] | None) -> Tensor:
        msg = torch.zeros(_HEADER + self.numel, dtype=torch.float64)
        msg[0] = float(kind)
        for i, v in enumerate(header[: _HEADER - 1]):
            msg[1 + i] = float(v)
        if params is not None:
            off = _HEADER
            for n, k in zip(self.names, self.numels):
                msg[off:off + k] = params[n].reshape(-1).to(torch.float64)
                off += k
        return msg

    def unpack(self, msg: Tensor) -> tuple[int, list[float], ParamDict]:
        out: ParamDict = {}
        off = _HEADER
        for n, s, k in zip(self.names, self.shapes, self.numels):
            out[n] = msg[off:off + k].to(torch.float32).reshape(s).clone()
            off += k
        return int(msg[0].item()), msg[1:_HEADER].tolist(), out

    def empty(self) -> Tensor:
        return torch.zeros(_HEADER + self.numel, dtype=torch.float64)


@dataclass
class Message:
    """What the server's queue yields: an update (``kind == UPDATE``) or a client's death (``kind == 0``)."""

    client_id: int
    kind: int
    header: list[float]
    delta: ParamDict | None
    error: str = ""


class ServerTransport:
    """Rank 0's side: one receiver thread per client feeding a queue; non-blocking-for-the-server sends.

    Args:
        layout: the parameter layout shared with the clients.
        num_clients: N (ranks 1..N).
        group: the process group (default: the default group).
    """

    def __init__(self, layout: ParamLayout, num_clients: int, group: Any = None) -> None:
        self.layout, self.num_clients, self.group = layout, num_clients, group
        self.queue: queue.Queue[Message] = queue.Queue()
        self.dead: set[int] = set()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for cid in range(self.num_clients):
            t = threading.Thread(target=self._receive_loop, args=(cid,), daemon=True, name=f"fl-recv-{cid}")
            t.start()
            self._threads.append(t)

    def _receive_loop(self, cid: int) -> None:
        while True:
            buf = self.layout.empty()
            try:
                dist.recv(buf, src=cid + 1, group=self.group)
            except Exception as err:  # the peer crashed or the group was torn down
                self.queue.put(Message(cid, 0, [], None, str(err).splitlines()[0][:200]))
                return
            kind, header, delta = self.layout.unpack(buf)
            self.queue.put(Message(cid, kind, header, delta))
            if kind == STOP:  # the client acknowledged shutdown; nothing more will come
                return

    def poll(self, timeout_s: float) -> Message | None:
        try:
            return self.queue.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def send(self, cid: int, kind: int, header: Sequence[float], params: Mapping[str, Tensor] | None) -> bool:
        """Send one message to client ``cid``; False (and the client marked dead) if the connection is gone."""
        if cid in self.dead:
            return False
        try:
            dist.send(self.layout.pack(kind, header, params), dst=cid + 1, group=self.group)
            return True
        except Exception:
            self.dead.add(cid)
            return False

    def join(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(timeout=max(deadline - time.monotonic(), 0.0))


@dataclass
class ClientFault:
    """Fault injection for tests: after ``after_updates`` sent updates, ``"crash"`` (``os._exit``) or ``"stall"``."""

    kind: str
    after_updates: int


def run_client(
    client_id: int, module: Any, stream: Any, layout: ParamLayout, local_steps: int, prox_mu: float,
    step_delay_s: float = 0.0, fault: ClientFault | None = None, group: Any = None,
) -> int:
    """A client process's whole life: receive a task, train K local steps, send the delta; until STOP.

    Returns the number of updates sent. The stream is advanced to ``seq·K`` batches before each task, so a client
    restarted after a server resume continues its data order exactly.
    """
    from lightning_convergence.federated.client import local_train

    sent = 0
    while True:
        buf = layout.empty()
        dist.recv(buf, src=0, group=group)
        kind, header, params = layout.unpack(buf)
        if kind == STOP:
            dist.send(layout.pack(STOP, [], None), dst=0, group=group)
            return sent
        version, seq = int(header[0]), int(header[1])
        stream.seek(seq * local_steps)
        delta, loss, nonfinite = local_train(module, params, stream, local_steps, prox_mu)
        if step_delay_s > 0:
            time.sleep(step_delay_s * local_steps)
        if fault is not None and sent >= fault.after_updates:
            if fault.kind == "crash":
                os._exit(17)
            time.sleep(3600.0)  # stall: the server must not wait for us
        dist.send(layout.pack(UPDATE, [version, seq, loss, nonfinite], delta), dst=0, group=group)
        sent += 1
