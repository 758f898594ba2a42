"""``AsyncFederatedStrategy``: a federated server (rank 0) and client ranks over gloo point-to-point.

Two ways to get the client ranks:

* **forked** (one machine, a plain ``python``/``lightning-convergence`` command): the process that runs
  ``Trainer.fit`` is the server and forks N client processes (ranks 1..N) at ``setup``;
* **launched** (``torchrun``, ``srun`` under SLURM, or Lightning's own launcher with ``devices``/``num_nodes`` > 1):
  every launched process runs the same command; global rank 0 is the server and ranks 1..W−1 are client ranks, on
  any node. Client ``c`` lives on rank ``1 + c mod (W−1)``; a rank with several clients serves them in turn.

Each client runs the user's unchanged ``LightningModule`` (its ``training_step`` and the first optimizer of
``configure_optimizers``) for K local steps on its own shard and pushes ``Δ = w_local − w_global``. One Lightning
training step on the server is one server model update of the chosen rule; the server's validation loop evaluates the
global model, and checkpoints hold the global model, the rule's state and the version counter. On a launched client
rank the Lightning loop does nothing: the rank serves tasks until the server says STOP, then ``fit`` returns.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import ClusterEnvironment
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from typing_extensions import override

from lightning_convergence._checks import check_state_version
from lightning_convergence._metrics import log_metrics, should_log
from lightning_convergence.data.federated import FederatedDataModule
from lightning_convergence.federated.base import ServerRule
from lightning_convergence.federated.client import ClientStream, load_params, module_params
from lightning_convergence.federated.fedbuff import FedBuff
from lightning_convergence.federated.processes import (
    check_fl_arguments,
    check_launch,
    fork_clients,
    server_step_metrics,
)
from lightning_convergence.federated.server import FederatedServer
from lightning_convergence.federated.simulation import FederatedSimulation
from lightning_convergence.federated.transport import (
    ClientWork,
    ParamLayout,
    ServerTransport,
    clients_of_rank,
    serve_clients,
    torch_p2p,
)

__all__ = ["AsyncFederatedStrategy", "FederatedDataModule", "log_simulation", "register_strategies"]

_STATE_KEY = "convergence/fl"
_STATE_VERSION = 1


def log_simulation(trainer: Any, simulation: FederatedSimulation) -> None:
    """Write what a finished :class:`FederatedSimulation` recorded as ``convergence/fl/*``, one row per version."""
    for version, metrics in simulation.metric_rows:
        log_metrics(trainer, "fl", metrics, step=version)


class AsyncFederatedStrategy(SingleDeviceStrategy):
    """Asynchronous (FedAsync, FedBuff, FedFix) or synchronous (FedAvg, FedProx, FedAU) federated training.

    Paper:
        Nguyen et al. *Federated Learning with Buffered Asynchronous Aggregation.* AISTATS 2022, arXiv:2106.06639;
        Xie, Koyejo, Gupta. *Asynchronous Federated Optimization.* arXiv:1903.03934; Fraboni, Vidal, Kameni, Lorenzi.
        *A General Theory for Federated Optimization with Asynchronous and Heterogeneous Clients Updates.* JMLR 2023,
        arXiv:2206.10189; Wang, Ji. *A Lightweight Method for Tackling Unknown Participation Statistics in Federated
        Averaging.* ICLR 2024, arXiv:2306.03401; Li et al. *Federated Optimization in Heterogeneous Networks.* MLSys
        2020, arXiv:1812.06127. The rule itself is the ``rule`` core; this class only wires processes and Lightning.

    Deviations:
        Without a launcher, clients are forked from the server process (``fork`` start method, one machine); under
        ``torchrun``/``srun``/Lightning's launcher they are the launched ranks 1..W−1 (several clients per rank when
        ``num_clients`` > W−1, served in turn). No Lightning ``Trainer`` loop runs per client (manual loop:
        ``training_step`` → ``backward`` → ``optimizer.step``, with a fresh optimizer from
        ``configure_optimizers`` every local round; schedulers, clipping, accumulation and hooks are not applied on
        clients). Only trainable parameters are federated. The server's own optimizer is created but never stepped.
        Updates still in flight when the run ends are discarded (they were never accepted), and after a resume the
        clients restart from the restored global model (in-flight work is not part of any checkpoint).
        ``speeds`` slow clients by sleeping ``step_delay_s·speed`` per local step (emulated heterogeneity, on top of
        the client hardware's own speed). Launched client ranks use ``cuda:<local rank>`` when the Trainer's
        accelerator is CUDA (the server stays on CPU); that path is not yet run on a GPU.

    Args:
        rule: the server rule (YAML: ``class_path`` + ``init_args``). Default ``FedBuff(buffer_size=max(1, N//2))``.
        num_clients: N clients, ≥ 1; must equal the datamodule's ``num_clients``. Forked: N processes. Launched
            with W processes: N ≥ W−1 (client c on rank 1 + c mod (W−1)). Default ``4``.
        local_steps: K local optimizer steps per update, ≥ 1. Default ``5``. More steps: fewer messages, more drift.
        speeds: per-client slowdown factors (≥ 0), multiplied by ``step_delay_s``. Default all ``1``.
        step_delay_s: emulated seconds per local step at speed 1, ≥ 0. Default ``0.0`` (run at native speed).
        participation_probs: round-based rules only: per-client Bernoulli p_n of joining a round. Default all join.
        round_timeout_s: round-based rules: a round closes after this many seconds without all reports. Default 30.
        serve_timeout_s: the server stops training (with a warning) when no server update happened for this long.
            Default ``120``.
        shutdown_timeout_s: how long the server waits for clients to acknowledge STOP before killing them.
            Default ``10``.
        process_group_timeout_s: gloo timeout, > 0. Default ``60``.
        seed: seed of the clients' batch streams and of participation draws. Default ``0``.
        log_per_item: also log ``convergence/fl/participation/client<n>``. Default ``False``.
        event_order: asynchronous rules only: force the arrival order (client ids), for equivalence tests.
        faults: fault injection for tests: ``{client_id: ["crash" | "kill" | "stall", after_updates]}`` (the
            client's whole process exits, is SIGKILLed, or sleeps for an hour after that many updates).

    State:
        Checkpoint key ``convergence/fl``: ``{"version", "rule": rule.state_dict(), "server": {"round_idx",
        "order_pos", "clock"}}``; the global model is also the LightningModule's weights.

    Logs:
        From the server, at ``log_every_n_steps``: ``convergence/fl/staleness_steps`` (mean),
        ``convergence/fl/updates_applied_total``, ``convergence/fl/updates_accepted_total``,
        ``convergence/fl/updates_received_total``, ``convergence/fl/updates_pending``, ``convergence/fl/version``,
        ``convergence/fl/nonfinite_skipped_total``, ``convergence/fl/duplicate_skipped_total``,
        ``convergence/fl/stale_rejected_total``, ``convergence/fl/clients_alive``,
        ``convergence/fl/updates_discarded_total``, ``convergence/fl/client_nonfinite_steps_total``,
        ``convergence/fl/clients_dropped_total``, ``convergence/fl/bytes_sent_total`` and
        ``convergence/fl/bytes_received_total`` (the server's point-to-point link bytes),
        ``convergence/fl/client_loss``; with ``log_per_item``
        ``convergence/fl/participation/client<n>``; at the end of training ``convergence/fl/staleness_count/<τ>``.
        Validation metrics are the user's own (``val_*``), computed on the global model.

    Raises:
        ValueError: for out-of-range arguments (named), ``participation_probs`` with a non-round rule,
            ``event_order`` with a synchronous rule, or a datamodule with a different ``num_clients``; at ``setup``
            for a launch with more client ranks than clients, or ``event_order`` with several clients per rank.
        RuntimeError: at ``setup`` for a launch it cannot run: a launched process group of another backend already
            initialised, or ``fit`` run by one process of a multi-process launch outside a launcher.
        TypeError: if ``rule`` is not a ``ServerRule``, a count is not an int (bools included), a speed or timeout is
            not a number, or the datamodule has no ``client_dataset``.

    Example:
        >>> # Trainer(strategy=AsyncFederatedStrategy(rule=FedBuff(buffer_size=4), num_clients=8), max_steps=200,
        >>> #         accelerator="cpu", devices=1).fit(model, FederatedDataModule(DigitsDataModule(), num_clients=8))
    """

    strategy_name = "async_fl"

    def __init__(
        self, rule: ServerRule | None = None, num_clients: int = 4, local_steps: int = 5,
        speeds: Sequence[float] | None = None, step_delay_s: float = 0.0,
        participation_probs: Sequence[float] | None = None, round_timeout_s: float = 30.0,
        serve_timeout_s: float = 120.0, shutdown_timeout_s: float = 10.0, process_group_timeout_s: float = 60.0,
        seed: int = 0, log_per_item: bool = False, event_order: Sequence[int] | None = None,
        faults: dict[int, Sequence[Any]] | None = None,
    ) -> None:
        super().__init__(device="cpu")
        if rule is None and isinstance(num_clients, int):
            rule = FedBuff(buffer_size=max(1, num_clients // 2))
        checked = check_fl_arguments(
            "AsyncFederatedStrategy", rule, num_clients, local_steps, speeds, participation_probs, seed, event_order,
            faults, step_delay_s=step_delay_s, round_timeout_s=round_timeout_s, serve_timeout_s=serve_timeout_s,
            shutdown_timeout_s=shutdown_timeout_s, process_group_timeout_s=process_group_timeout_s)
        self.rule, self.num_clients, self.local_steps, self.speeds = rule, num_clients, local_steps, checked.speeds
        self.participation, self.event_order, self.faults = checked.participation, checked.event_order, checked.faults
        self.step_delay_s, self.round_timeout_s = float(step_delay_s), float(round_timeout_s)
        self.serve_timeout_s, self.shutdown_timeout_s = float(serve_timeout_s), float(shutdown_timeout_s)
        self.process_group_timeout_s, self.seed, self.log_per_item = float(process_group_timeout_s), seed, log_per_item
        self.server: FederatedServer | None = None
        self.cluster_environment: ClusterEnvironment | None = None  # set by Lightning's connector
        self.parallel_devices: list[torch.device] | None = None  # set by Lightning's connector (``devices``)
        self.num_nodes = 1  # set by Lightning's connector (``num_nodes``)
        self.role = "server"  # "server" or "client" (a launched client rank); decided at setup
        self.updates_sent = 0  # on a launched client rank: updates this rank sent
        self._procs: list[Any] = []
        self._restored: dict | None = None
        self.stuck_clients: set[int] = set()
        self.deaths: dict[int, str] = {}
        self.discarded_total = 0
        self.bytes_sent_total = self.bytes_received_total = 0  # the server's link bytes, kept after teardown

    # --------------------------------------------------------------- launching
    @property
    def num_processes(self) -> int:
        return len(self.parallel_devices) if self.parallel_devices else 1

    def _launched(self) -> bool:
        env = self.cluster_environment
        return env is not None and env.creates_processes_externally and env.world_size() > 1

    @property
    @override
    def is_global_zero(self) -> bool:
        return self.global_rank == 0

    def set_world_ranks(self) -> None:
        """Called by Lightning's connector: ranks as DDP numbers them (node-major), for Lightning's own launcher."""
        env = self.cluster_environment
        if env is None:
            return
        env.set_global_rank(env.node_rank() * self.num_processes + env.local_rank())
        env.set_world_size(self.num_nodes * self.num_processes)
        if self._launched():  # Lightning's view stays one process (world_size 1); the ranks say who writes
            self.global_rank, self.local_rank = env.global_rank(), env.local_rank()
        rank_zero_only.rank = self.global_rank

    @override
    def _configure_launcher(self) -> None:
        env = self.cluster_environment
        if env is not None and not env.creates_processes_externally and self.num_nodes * self.num_processes > 1:
            # Lightning's own launcher (private API, as DDPStrategy uses it): re-runs the command once per extra
            # local process with LOCAL_RANK/NODE_RANK/WORLD_SIZE set; the test of 1 node × 2 processes covers it.
            self._launcher = _SubprocessScriptLauncher(env, self.num_processes, self.num_nodes)

    @override
    def setup(self, trainer: Any) -> None:
        super().setup(trainer)
        if trainer.state.fn == TrainerFn.FITTING and self.server is None:
            self._launch(trainer)

    def _check_datamodule(self, trainer: Any) -> Any:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "client_dataset"):
            raise TypeError("AsyncFederatedStrategy: the datamodule must give client shards (`client_dataset`); "
                            "wrap it: FederatedDataModule(your_datamodule, num_clients=...).")
        if getattr(dm, "num_clients", self.num_clients) != self.num_clients:
            raise ValueError(f"AsyncFederatedStrategy: `num_clients`={self.num_clients} must equal the datamodule's "
                             f"num_clients={dm.num_clients}.")
        return dm

    def _client_work(self, dm: Any, cid: int) -> ClientWork:
        dataset, indices = dm.client_dataset(cid)
        stream = ClientStream(dataset, indices, int(getattr(dm, "client_batch_size", 32)), seed=self.seed,
                              client_id=cid)
        return ClientWork(stream, self.step_delay_s * self.speeds[cid], self.faults.get(cid))

    def _launch(self, trainer: Any) -> None:
        dm = self._check_datamodule(trainer)
        module = self.lightning_module
        if self._launched():
            self._join_launched_group(trainer, dm, module)
            if self.role == "client":
                return
        server_state = None
        if self._restored is not None:
            self.rule.load_state_dict(self._restored["rule"])
            server_state = self._restored["server"]
            self._restored = None
        elif not self.rule.params:
            self.rule.init_params(module_params(module))
        load_params(module, self.rule.params)
        layout = ParamLayout(self.rule.params)
        if self._launched():
            ranks = self.cluster_environment.world_size() - 1
        else:
            ranks = self.num_clients
            works = [self._client_work(dm, cid) for cid in range(self.num_clients)]
            self._procs = fork_clients(works, module, layout, self.local_steps, self.rule.prox_mu,
                                       self.process_group_timeout_s)
        self.server = FederatedServer(self.rule, ServerTransport(layout, self.num_clients, ranks, torch_p2p()),
                                      self.participation, round_timeout_s=self.round_timeout_s,
                                      event_order=self.event_order, state=server_state)
        self.server.start()

    def _join_launched_group(self, trainer: Any, dm: Any, module: Any) -> None:
        """Launched mode: join the launch's gloo group; a client rank serves its clients here until STOP."""
        env = self.cluster_environment
        rank, world = env.global_rank(), env.world_size()
        # Lightning's launcher sets LOCAL_RANK only when it starts the other processes, after `set_world_ranks`.
        self.global_rank, self.local_rank = rank, env.local_rank()
        rank_zero_only.rank = rank
        check_launch("AsyncFederatedStrategy", self.num_clients, world, self.event_order)
        if dist.is_initialized():
            if dist.get_backend() != "gloo" or dist.get_world_size() != world:
                raise RuntimeError(
                    f"AsyncFederatedStrategy: a process group ({dist.get_backend()}, world size "
                    f"{dist.get_world_size()}) is already initialised in this launched process; the federated server "
                    f"needs its own gloo group of all {world} launched processes. Destroy it before `fit`.")
        else:
            os.environ.setdefault("MASTER_ADDR", env.main_address)
            os.environ.setdefault("MASTER_PORT", str(env.main_port))
            dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world,
                                    timeout=timedelta(seconds=self.process_group_timeout_s))
        if rank == 0:
            rank_zero_info(f"AsyncFederatedStrategy: launched mode, rank 0 of {world} is the server; "
                           f"{self.num_clients} clients on ranks 1..{world - 1}.")
            return
        self.role = "client"
        device = None
        if isinstance(trainer.accelerator, CUDAAccelerator) and torch.cuda.is_available():
            device = torch.device("cuda", env.local_rank() % torch.cuda.device_count())
            module.to(device)
        layout = ParamLayout(module_params(module))
        work = {cid: self._client_work(dm, cid) for cid in clients_of_rank(rank, self.num_clients, world - 1)}
        attached = module.trainer
        module.trainer = None  # self.log() inside training_step becomes a no-op while serving
        try:
            self.updates_sent = serve_clients(work, module, layout, self.local_steps, self.rule.prox_mu,
                                              torch_p2p(), device=device)
        finally:
            module.trainer = attached
        # Nothing left for Lightning to do on a client rank: no sanity check, no validation, no training steps.
        trainer.num_sanity_val_steps = 0
        trainer.limit_val_batches = 0
        trainer.should_stop = True

    # --------------------------------------------------------------- training
    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        """One server model update: serve clients until the rule's version advances, then load the global model."""
        if self.server is None:
            if self.role == "client":  # a launched client rank that already served its clients
                self.lightning_module.trainer.should_stop = True
                return None
            raise RuntimeError("AsyncFederatedStrategy: the server is not running; `training_step` runs only in fit.")
        trainer = self.lightning_module.trainer
        ok = self.server.serve_until(self.rule.version + 1, timeout_s=self.serve_timeout_s)
        if not ok:
            rank_zero_warn(f"AsyncFederatedStrategy: no server update possible (clients alive: "
                           f"{sorted(self.server.alive)}, deaths: {self.server.deaths}); stopping training.")
            trainer.should_stop = True
        load_params(self.lightning_module, self.rule.params)
        loss, metrics = server_step_metrics(self.rule, self.server.metrics(), self.server.pop_losses(),
                                            self.log_per_item)
        if should_log(trainer):
            log_metrics(trainer, "fl", metrics)
        return torch.tensor(loss)

    @override
    def backward(self, closure_loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        return closure_loss  # the server computes no gradients: clients did the training

    @override
    def optimizer_step(self, optimizer: Any, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        return closure()  # runs training_step (one server update); the server's own optimizer never steps

    @override
    def on_train_end(self) -> None:
        if self.role == "client":
            return
        log_metrics(self.lightning_module.trainer, "fl",
                    {**self.rule.metrics(self.log_per_item), **self.rule.staleness_counts()})

    # ------------------------------------------------------------- checkpoints
    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        checkpoint[_STATE_KEY] = {
            "version": _STATE_VERSION, "rule": self.rule.state_dict(),
            "server": self.server.state_dict() if self.server else {"round_idx": 0, "order_pos": 0, "clock": 0.0},
        }
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @override
    def load_checkpoint(self, checkpoint_path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, *args, **kwargs)
        entry = checkpoint.get(_STATE_KEY)
        if entry is not None:
            check_state_version("AsyncFederatedStrategy", entry, _STATE_VERSION)
            self._restored = entry
        return checkpoint

    # ---------------------------------------------------------------- teardown
    @override
    def teardown(self) -> None:
        if self.server is not None:
            stalled = self.server.shutdown(self.shutdown_timeout_s)
            self.stuck_clients = {c for c in range(self.num_clients) if self.server.transport.rank_of(c) in stalled}
            self.deaths, self.discarded_total = dict(self.server.deaths), self.server.discarded_total
            p2p = self.server.transport.p2p
            self.bytes_sent_total, self.bytes_received_total = p2p.bytes_sent_total, p2p.bytes_received_total
            for proc in self._procs:
                proc.join(timeout=0.5 if proc.pid is None else 2.0)
                if proc.is_alive():
                    proc.kill()  # a stalled client we forked: ours to end
                    proc.join(timeout=5.0)
            report = self.server.report()
            if report:
                rank_zero_warn(f"AsyncFederatedStrategy: the run ended without some clients; {report}.")
            self.server.transport.join(timeout_s=5.0)
            if dist.is_initialized() and not (stalled and self._launched()):
                dist.destroy_process_group()
            elif stalled:  # a stalled launched rank still holds its connection: the launcher must end it
                rank_zero_warn(f"AsyncFederatedStrategy: launched ranks {sorted(stalled)} did not stop; the process "
                               "group is left open so this process can exit; end those ranks through the launcher.")
            self.server = None
            self._procs = []
        elif self.role == "client" and dist.is_initialized():
            dist.destroy_process_group()
        super().teardown()


def register_strategies() -> None:
    """Register ``async_fl`` (FedBuff with a buffer of half the clients, 4 clients) in Lightning's registry."""
    from lightning_convergence.strategies import register_strategy

    register_strategy("async_fl", AsyncFederatedStrategy,
                      "Asynchronous federated learning (FedBuff server, 4 gloo clients: forked, or the "
                      "launched ranks 1..W-1 under torchrun/SLURM)")
