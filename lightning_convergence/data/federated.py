"""``FederatedDataModule``: wrap any datamodule and hand each federated client its own shard of the training set."""

from __future__ import annotations

import copy
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import AttributeDict
from torch.utils.data import DataLoader, Dataset

from lightning_convergence._checks import check_choice, check_int_at_least
from lightning_convergence.federated.partition import PARTITIONS, partition_indices

__all__ = ["FederatedDataModule"]


class _Ticks(Dataset):
    """The server's 'training set': one dummy item per server model update (the server trains nothing itself)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.zeros(1)


def _labels_of(dataset: Any) -> torch.Tensor:
    tensors = getattr(dataset, "tensors", None)
    if tensors is not None and len(tensors) >= 2:
        return torch.as_tensor(tensors[1]).reshape(-1)
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])


def _repair_nested_hparams(datamodule: Any) -> None:
    """Give a wrapped datamodule built by LightningCLI its own hyperparameters back.

    LightningCLI hands every ``LightningDataModule`` instantiated under the ``data`` key the *whole* ``data``
    config as hyperparameters, so an inner module that calls ``save_hyperparameters()`` gets ours (``num_clients``,
    ``datamodule``, ...) and ``self.hparams.<its field>`` fails. Its own ``init_args`` sit in that config: restore
    them. (Private attributes of Lightning's hyperparameters mixin; ``tests/data`` fails if they change.)
    """
    hparams = getattr(datamodule, "_hparams", None)
    if not hparams or "datamodule" not in hparams or "num_clients" not in hparams:
        return
    inner = hparams["datamodule"]
    init_args = inner.get("init_args") if isinstance(inner, dict) else getattr(inner, "init_args", None)
    if init_args is None:
        return
    own = AttributeDict(dict(vars(init_args)) if not isinstance(init_args, dict) else init_args)
    datamodule._hparams = own
    datamodule._hparams_initial = copy.deepcopy(own)


class FederatedDataModule(LightningDataModule):
    """Partition a datamodule's training set across clients; validation and test stay global (on the server).

    Paper:
        Dirichlet label skew as in Hsu, Qi, Brown. *Measuring the Effects of Non-Identical Data Distribution for
        Federated Visual Classification.* arXiv:1909.06335 (2019).

    Deviations:
        The wrapped module's ``train_dataloader()`` is called once to find the training dataset (its ``.dataset``);
        its sampler, shuffling and batch size are not used by clients (each client has its own seeded stream).
        ``train_dataloader()`` of this module yields ``server_steps_per_epoch`` dummy items: with
        :class:`~lightning_convergence.strategies.async_fl.AsyncFederatedStrategy` one Lightning training step is one
        server model update, so an "epoch" is that many server updates.

    Args:
        datamodule: the datamodule to wrap (any ``LightningDataModule`` whose train loader has a map-style dataset).
        num_clients: N, ≥ 1; must equal the strategy's ``num_clients``.
        partition: ``"iid"``, ``"dirichlet"`` (label skew; needs labels as ``dataset[i][1]`` or a TensorDataset)
            or ``"quantity"`` (sizes ∝ Dir(α)). Default ``"iid"``.
        alpha: Dirichlet concentration α > 0. Default ``0.5``; 0.1 is severe skew, 100 nearly IID.
        seed: partition seed. Default ``0``.
        min_size: every client gets at least this many examples. Default ``1``.
        client_batch_size: examples per local step; default the wrapped module's ``batch_size`` (or 32).
        server_steps_per_epoch: length of the server's dummy epoch, ≥ 1. Default ``100``.

    Raises:
        ValueError: for an unknown ``partition``, ``num_clients`` < 1, or the errors of
            :func:`~lightning_convergence.federated.partition.partition_indices`.

    Example:
        >>> from lightning_convergence.examples import DigitsDataModule
        >>> dm = FederatedDataModule(DigitsDataModule(), num_clients=8, partition="dirichlet", alpha=0.3)
    """

    def __init__(
        self, datamodule: LightningDataModule, num_clients: int = 8, partition: str = "iid", alpha: float = 0.5,
        seed: int = 0, min_size: int = 1, client_batch_size: int | None = None, server_steps_per_epoch: int = 100,
    ) -> None:
        super().__init__()
        check_choice("FederatedDataModule", "partition", partition, PARTITIONS)
        check_int_at_least("FederatedDataModule", "num_clients", num_clients, 1)
        check_int_at_least("FederatedDataModule", "server_steps_per_epoch", server_steps_per_epoch, 1)
        _repair_nested_hparams(datamodule)
        self.datamodule = datamodule
        self.num_clients, self.partition, self.alpha = num_clients, partition, alpha
        self.seed, self.min_size = seed, min_size
        self.client_batch_size = client_batch_size or int(getattr(datamodule, "batch_size", 32))
        self.server_steps_per_epoch = server_steps_per_epoch
        self.train_dataset: Any = None
        self.client_indices: list[list[int]] = []

    def prepare_data(self) -> None:
        self.datamodule.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        self.datamodule.setup(stage)
        if self.client_indices or stage not in (None, "fit"):
            return
        self.train_dataset = self.datamodule.train_dataloader().dataset
        labels = _labels_of(self.train_dataset) if self.partition == "dirichlet" else None
        self.client_indices = partition_indices(
            len(self.train_dataset), self.num_clients, self.partition, labels=labels, alpha=self.alpha,
            seed=self.seed, min_size=self.min_size,
        )

    def client_dataset(self, client_id: int) -> tuple[Any, list[int]]:
        """``(dataset, indices)`` of client ``client_id`` (call after ``setup("fit")``)."""
        if not self.client_indices:
            raise RuntimeError("FederatedDataModule: call `setup('fit')` before `client_dataset`.")
        return self.train_dataset, self.client_indices[client_id]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Ticks(self.server_steps_per_epoch), batch_size=1)

    def val_dataloader(self) -> Any:
        return self.datamodule.val_dataloader()

    def test_dataloader(self) -> Any:
        return self.datamodule.test_dataloader()
