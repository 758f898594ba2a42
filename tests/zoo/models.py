"""A zoo of foreign LightningModule shapes the project did not write, each with a tiny learnable data set.

Every module here is written the way a user would write it, with nothing the project asks for
(no ``sample_weights``, no ``per_sample_loss``, no ``(inputs, targets)`` convention):

* :class:`TupleMLP` — ``(x, y)`` batches, a plain ``forward(x)``;
* :class:`DictCNN` — ``{"image", "label"}`` batches and **no** ``forward`` (the layers are called in
  ``training_step``), logs its loss with ``self.log``;
* :class:`GRUClassifier` — ``(sequence, y)`` batches through an ``nn.GRU`` (``torch.func.vmap`` cannot batch it);
* :class:`TargetTransformer` — ``forward(x, target)`` returns log-probabilities, ``training_step`` takes a
  ``nll_loss`` (the shape of Lightning's demo ``LightningTransformer``), with dropout;
* :class:`DictOutputTransformer` — ``forward(x)`` returns a dict, ``training_step`` returns ``{"loss": ...}``.

Data are seeded teacher problems (a fixed random linear/rule teacher), small enough that each model fits them
in a few hundred CPU steps, so convergence-dependent behaviour (early stopping) can be checked.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

__all__ = ["ZOO", "ZooEntry", "TupleMLP", "DictCNN", "GRUClassifier", "TargetTransformer", "DictOutputTransformer"]

N_TRAIN = 256
N_CLASSES = 4


def _teacher_labels(features: Tensor, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    w = torch.randn(features.shape[1], N_CLASSES, generator=g)
    return (features @ w).argmax(dim=1)


class _DictDataset(Dataset):
    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return self.labels.numel()

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"image": self.images[i], "label": self.labels[i]}


class ZooData(LightningDataModule):
    """Train/val loaders over one seeded data set (val = the first 64 training examples)."""

    def __init__(self, dataset: Dataset, batch_size: int = 16) -> None:
        super().__init__()
        self.dataset, self.batch_size = dataset, batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(0))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(torch.utils.data.Subset(self.dataset, range(64)), batch_size=64)


def tabular_data(seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_TRAIN, 8, generator=g)
    return TensorDataset(x, _teacher_labels(x, seed))


def image_data(seed: int = 0) -> _DictDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(N_TRAIN, 1, 6, 6, generator=g)
    return _DictDataset(images, _teacher_labels(images.flatten(1), seed))


def sequence_data(seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    seq = torch.randn(N_TRAIN, 5, 3, generator=g)
    return TensorDataset(seq, _teacher_labels(seq.mean(dim=1), seed))


def token_data(seed: int = 0, vocab: int = 8, length: int = 6) -> TensorDataset:
    """Next-token targets of a fixed rule (target = input + 1 mod vocab): learnable by a one-layer model."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (N_TRAIN, length), generator=g)
    return TensorDataset(x, (x + 1) % vocab)


class _Classifier(LightningModule):
    lr = 0.05

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class TupleMLP(_Classifier):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, N_CLASSES))
        self.lr = 0.2

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())


class DictCNN(_Classifier):
    """No ``forward``: the layers are used directly in the steps."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, kernel_size=3)
        self.head = nn.Linear(4 * 4 * 4, N_CLASSES)
        self.lr = 0.1

    def _logits(self, image: Tensor) -> Tensor:
        return self.head(torch.relu(self.conv(image)).flatten(1))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = F.cross_entropy(self._logits(batch["image"]), batch["label"])
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.log("val_loss", F.cross_entropy(self._logits(batch["image"]), batch["label"]))


class GRUClassifier(_Classifier):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(3, 8, batch_first=True)
        self.head = nn.Linear(8, N_CLASSES)
        self.lr = 0.3

    def forward(self, seq: Tensor) -> Tensor:
        _, h = self.gru(seq)
        return self.head(h[-1])

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        seq, y = batch
        return F.cross_entropy(self(seq), y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        seq, y = batch
        logits = self(seq)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())


class _TinyEncoder(nn.Module):
    def __init__(self, vocab: int = 8, dim: int = 16, dropout: float = 0.1) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.decoder = nn.Linear(dim, vocab)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embedding(x)
        return self.decoder(self.dropout(torch.tanh(self.mix(h))))


class TargetTransformer(_Classifier):
    """``forward(inputs, target)`` as Lightning's demo ``LightningTransformer`` (log-probabilities, flat)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = _TinyEncoder()
        self.lr = 0.5

    def forward(self, inputs: Tensor, target: Tensor) -> Tensor:
        return F.log_softmax(self.model(inputs), dim=-1).view(-1, 8)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, target = batch
        output = self(inputs, target)
        return F.nll_loss(output, target.view(-1))

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        inputs, target = batch
        self.log("val_loss", F.nll_loss(self(inputs, target), target.view(-1)))


class DictOutputTransformer(_Classifier):
    """``forward`` returns a dict and ``training_step`` returns ``{"loss": ...}``."""

    def __init__(self) -> None:
        super().__init__()
        self.model = _TinyEncoder()
        self.lr = 0.5

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"logits": self.model(x)}

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        x, y = batch
        logits = self(x)["logits"]
        return {"loss": F.cross_entropy(logits.flatten(0, 1), y.flatten()), "tokens": torch.tensor(y.numel())}

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x)["logits"].flatten(0, 1), y.flatten()))


class ZooEntry:
    """A module class, its data and a label for test ids."""

    def __init__(self, name: str, module: Callable[[], LightningModule], data: Callable[[], Dataset]) -> None:
        self.name, self.module, self.data = name, module, data

    def datamodule(self, batch_size: int = 16) -> ZooData:
        return ZooData(self.data(), batch_size=batch_size)

    def __repr__(self) -> str:
        return self.name


ZOO: tuple[ZooEntry, ...] = (
    ZooEntry("tuple_mlp", TupleMLP, tabular_data),
    ZooEntry("dict_cnn", DictCNN, image_data),
    ZooEntry("gru", GRUClassifier, sequence_data),
    ZooEntry("target_transformer", TargetTransformer, token_data),
    ZooEntry("dict_output_transformer", DictOutputTransformer, token_data),
)
