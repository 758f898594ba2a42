"""The point-to-point layer and the launched-mode checks, in one process (no launcher, no sockets).

A fake :class:`P2P` made of in-memory queues stands in for gloo, the way torchft's tests fake an all-reduce: the server
loop and ``serve_clients`` run unchanged in threads, so the per-rank dispatch rule and the byte counts can be checked
exactly.
"""

from __future__ import annotations

import queue
import threading

import pytest
import torch
from lightning.pytorch import Trainer

from lightning_convergence.data import FederatedDataModule
from lightning_convergence.examples import LinearModel, SyntheticRegressionDataModule
from lightning_convergence.federated import ClientStream, FedBuff, module_params
from lightning_convergence.federated.server import FederatedServer
from lightning_convergence.federated.transport import (
    P2P,
    TASK,
    UPDATE,
    ClientWork,
    ParamLayout,
    ServerTransport,
    clients_of_rank,
    message_nbytes,
    rank_of_client,
    serve_clients,
)
from lightning_convergence.strategies.async_fl import AsyncFederatedStrategy
from tests.multinode.launch import free_port

pytestmark = [pytest.mark.timeout(60), pytest.mark.filterwarnings("ignore:.*self.log.*")]


def test_message_round_trip_is_exact_and_its_size_is_header_plus_float32_params():
    params = {"w": torch.tensor([[1.5, -2.0], [3.25, 1e-8]]), "b": torch.tensor([7.0])}
    layout = ParamLayout(params)
    header = [2.0**40 + 1, 12.0, 0.123456789, 3.0]  # a counter past float32's 2^24 and a float64 loss
    msg = layout.pack(UPDATE, 5, header, params)
    kind, cid, head, out = layout.unpack(msg)
    assert (kind, cid) == (UPDATE, 5) and head[:4] == header
    assert all(torch.equal(out[k], params[k]) for k in params)
    assert msg.numel() * msg.element_size() == message_nbytes(layout) == 16 * 4 + 5 * 4  # 8 float64 + 5 float32


def test_clients_are_spread_over_the_client_ranks():
    assert [rank_of_client(c, 2) for c in range(5)] == [1, 2, 1, 2, 1]
    assert clients_of_rank(1, 5, 2) == [0, 2, 4] and clients_of_rank(2, 5, 2) == [1, 3]


class _FakeNetwork:
    """In-memory point-to-point links; counts tasks in flight per client rank."""

    def __init__(self) -> None:
        self.links: dict[tuple[int, int], queue.Queue] = {}
        self.in_flight: dict[int, int] = {}
        self.max_in_flight = 0
        self.lock = threading.Lock()

    def _q(self, src: int, dst: int) -> queue.Queue:
        with self.lock:
            return self.links.setdefault((src, dst), queue.Queue())

    def p2p(self, me: int) -> P2P:
        def send(t, dst):
            if me == 0 and int(t[:16].view(torch.float64)[0]) == TASK:
                with self.lock:
                    self.in_flight[dst] = self.in_flight.get(dst, 0) + 1
                    self.max_in_flight = max(self.max_in_flight, self.in_flight[dst])
            if me != 0 and int(t[:16].view(torch.float64)[0]) == UPDATE:
                with self.lock:
                    self.in_flight[me] -= 1
            self._q(me, dst).put(t.clone())

        def recv(buf, src):
            buf.copy_(self._q(src, me).get(timeout=30))

        return P2P(send, recv)


def test_one_rank_serves_three_clients_in_turn_with_one_task_in_flight_and_counted_bytes():
    torch.manual_seed(0)
    dm = FederatedDataModule(SyntheticRegressionDataModule(n_samples=96, dim=4, batch_size=8), num_clients=3, seed=0)
    dm.setup("fit")
    model = LinearModel(dim=4, lr=0.05)
    rule = FedBuff(buffer_size=2, staleness="constant")
    rule.init_params(module_params(model))
    layout, net = ParamLayout(rule.params), _FakeNetwork()
    work = {c: ClientWork(ClientStream(*dm.client_dataset(c), 8, seed=0, client_id=c)) for c in range(3)}
    client = threading.Thread(target=serve_clients, args=(work, LinearModel(dim=4), layout, 2, 0.0, net.p2p(1)),
                              daemon=True)
    client.start()
    transport = ServerTransport(layout, num_clients=3, num_client_ranks=1, p2p=net.p2p(0))
    server = FederatedServer(rule, transport)
    server.start()
    assert server.serve_until(6, timeout_s=30)
    assert server.shutdown(timeout_s=10) == set()
    client.join(timeout=10)
    assert not client.is_alive() and net.max_in_flight == 1  # a send never waits behind the rank's training
    assert set(rule.participation) == {0, 1, 2} and rule.counters["updates_applied_total"] == 12
    assert rule.counters["duplicate_skipped_total"] == 0
    received = rule.counters["updates_received_total"] + server.discarded_total + 1  # + the STOP acknowledgement
    assert transport.p2p.bytes_received_total == received * message_nbytes(layout)
    tasks = sum(1 for c in range(3) for _ in range(server.next_seq[c]))
    assert transport.p2p.bytes_sent_total == (tasks + 1) * message_nbytes(layout)  # tasks + one STOP
    assert server.metrics()["bytes_sent_total"] == transport.p2p.bytes_sent_total


def _launched_env(monkeypatch, world: int, rank: int = 0) -> None:
    for key, value in {"TORCHELASTIC_RUN_ID": "t", "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": "0",
                       "GROUP_RANK": str(rank), "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)


def _fit_launched(strategy: AsyncFederatedStrategy) -> None:
    data = FederatedDataModule(SyntheticRegressionDataModule(n_samples=64, dim=4, batch_size=8),
                               num_clients=strategy.num_clients)
    trainer = Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(LinearModel(dim=4), data)


def test_a_launch_with_more_client_ranks_than_clients_fails_before_any_connection(monkeypatch):
    _launched_env(monkeypatch, world=4)
    with pytest.raises(ValueError, match=r"`num_clients` must be >= 3, got 2"):
        _fit_launched(AsyncFederatedStrategy(num_clients=2))


def test_event_order_with_several_clients_per_launched_rank_is_refused(monkeypatch):
    _launched_env(monkeypatch, world=2)
    with pytest.raises(ValueError, match=r"`event_order` must be None when 2 clients share 1 launched .*got \[0, 1\]"):
        _fit_launched(AsyncFederatedStrategy(num_clients=2, event_order=[0, 1]))


def test_launched_ranks_are_read_from_the_launcher_environment(monkeypatch):
    _launched_env(monkeypatch, world=3, rank=2)
    strategy = AsyncFederatedStrategy(num_clients=2)
    trainer = Trainer(strategy=strategy, accelerator="cpu", devices=1, logger=False)
    assert strategy.global_rank == 2 and not strategy.is_global_zero and not trainer.is_global_zero
