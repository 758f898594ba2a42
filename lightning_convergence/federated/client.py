"""The client side shared by simulation and real processes: seeded batch streams and K local steps of the user's
unchanged ``training_step`` with the module's own optimizer (torch only; duck-typed, no Lightning import)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import default_collate

from lightning_convergence._checks import argument_error, check_int
from lightning_convergence.federated.base import ParamDict
from lightning_convergence.federated.fedprox import add_proximal_grad
from lightning_convergence.stats import all_finite, grads_of

__all__ = ["ClientStream", "local_train", "module_params", "load_params", "make_optimizer"]


class ClientStream:
    """An endless stream of mini-batches over one client's shard, reshuffled every epoch.

    Epoch ``e`` uses a permutation from a generator seeded by ``(seed, client_id, e)``, so the stream is a pure
    function of its position; :meth:`state_dict` holds ``(epoch, position)`` and a resumed stream continues exactly.

    Args:
        dataset: a map-style dataset (``dataset[i]`` gives one example).
        indices: the client's shard (indices into ``dataset``).
        batch_size: examples per local step, ≥ 1 (a shard smaller than this gives smaller batches).
        seed: stream seed. client_id: client id (mixed into the seed).

    Raises:
        ValueError: for ``batch_size`` < 1 or an empty shard.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> s = ClientStream(TensorDataset(torch.arange(10.0)), indices=range(10), batch_size=4, seed=0, client_id=3)
        >>> [len(s.next_batch()[0]) for _ in range(3)]
        [4, 4, 2]
    """

    def __init__(self, dataset: Any, indices: Sequence[int], batch_size: int, seed: int = 0, client_id: int = 0):
        check_int("ClientStream", "batch_size", batch_size, 1)
        if len(indices) == 0:
            raise argument_error("ClientStream", "indices", f"a non-empty shard for client {client_id}", [])
        self.dataset = dataset
        self.indices = torch.as_tensor(list(indices), dtype=torch.long)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.client_id = int(client_id)
        self.epoch = 0
        self.position = 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> Tensor:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.client_id) * 1_000_003 + epoch)
        return self.indices[torch.randperm(len(self.indices), generator=g)]

    def next_batch(self) -> Any:
        if self.position >= len(self._perm):
            self.epoch += 1
            self.position = 0
            self._perm = self._permutation(self.epoch)
        chunk = self._perm[self.position:self.position + self.batch_size].tolist()
        self.position += len(chunk)
        return default_collate([self.dataset[i] for i in chunk])

    def seek(self, num_batches: int) -> None:
        """Jump to the position reached after ``num_batches`` calls of :meth:`next_batch` from the start."""
        per_epoch = -(-len(self.indices) // self.batch_size)
        epoch, rest = divmod(int(num_batches), per_epoch)
        if epoch != self.epoch:
            self._perm = self._permutation(epoch)
        self.epoch, self.position = epoch, rest * self.batch_size

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._perm = self._permutation(self.epoch)


def module_params(module: torch.nn.Module) -> ParamDict:
    """The federated state of a module: its trainable parameters by name (float32 CPU copies)."""
    return {n: p.detach().to("cpu", torch.float32).clone() for n, p in module.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_params(module: torch.nn.Module, params: Mapping[str, Tensor]) -> None:
    """Copy ``params`` into the module's parameters in place."""
    named = dict(module.named_parameters())
    for n, v in params.items():
        named[n].copy_(v.to(named[n].device, named[n].dtype))


def make_optimizer(module: Any) -> torch.optim.Optimizer:
    """The first optimizer of ``module.configure_optimizers()`` (any of Lightning's return forms).

    LR schedulers are not stepped by clients (a fresh optimizer is built every local round); see Deviations of
    :class:`~lightning_convergence.federated.simulation.FederatedSimulation`.
    """
    return make_optimizer_from(module.configure_optimizers())


def make_optimizer_from(obj: Any) -> torch.optim.Optimizer:
    """The first optimizer in any of ``configure_optimizers``' return forms (optimizer, dict, list or tuple)."""
    if isinstance(obj, torch.optim.Optimizer):
        return obj
    if isinstance(obj, Mapping):
        return make_optimizer_from(obj["optimizer"])
    if isinstance(obj, (list, tuple)) and obj:
        return make_optimizer_from(obj[0])
    raise TypeError(f"make_optimizer: `configure_optimizers` must return an optimizer, got {type(obj).__name__}.")


def _to_device(batch: Any, device: Any) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def local_train(
    module: Any, params: Mapping[str, Tensor], stream: ClientStream, local_steps: int, prox_mu: float = 0.0,
    device: Any = None,
) -> tuple[ParamDict, float, int]:
    """Load ``params``, run K steps of ``module.training_step`` with a fresh ``configure_optimizers`` optimizer.

    Returns ``(delta, mean_loss, nonfinite_steps)`` with ``delta = w_local − params`` (float32, CPU). A step whose
    gradients are not finite is skipped (not applied) and counted. ``self.log`` calls inside ``training_step`` are
    ignored (no trainer is attached on the client side). ``device``: where batches go (the module must already be
    there); default: left where the stream puts them (CPU).
    """
    load_params(module, params)
    module.train()
    optimizer = make_optimizer(module)
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    anchor = params if device is None else {n: v.to(device) for n, v in params.items()}  # FedProx's w_global
    losses: list[Tensor] = []
    skipped = 0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*self\.log.*")
        for step in range(local_steps):
            batch = stream.next_batch()
            if device is not None:
                batch = _to_device(batch, device)
            optimizer.zero_grad(set_to_none=True)
            out = module.training_step(batch, step)
            loss = out["loss"] if isinstance(out, Mapping) else out
            loss.backward()
            add_proximal_grad(named, anchor, prox_mu)
            if not all_finite(grads_of(p for _, p in named)):
                skipped += 1
                continue
            optimizer.step()
            losses.append(loss.detach())
    delta = {n: p.detach().to("cpu", torch.float32) - params[n].to("cpu", torch.float32) for n, p in named}
    mean_loss = float(torch.stack(losses).float().mean()) if losses else float("nan")  # one sync per local round
    return delta, mean_loss, skipped
