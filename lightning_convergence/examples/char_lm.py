"""A character-level transformer language model on a corpus every machine has offline: the Python standard
library's own sources (a fixed list of modules, read from this interpreter's ``stdlib`` directory)."""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_convergence._checks import check_int_at_least, check_number

__all__ = ["DEFAULT_STDLIB_FILES", "StdlibTextDataModule", "CharTransformerLM", "load_stdlib_corpus"]

#: Modules present in every CPython ≥ 3.10; the text differs slightly between Python versions, never between runs.
DEFAULT_STDLIB_FILES: tuple[str, ...] = (
    "textwrap.py", "string.py", "functools.py", "contextlib.py", "bisect.py", "heapq.py",
    "fractions.py", "calendar.py", "shlex.py", "argparse.py", "enum.py", "dataclasses.py",
)
VOCAB_SIZE = 128  # 7-bit ASCII; other characters map to "?"


def load_stdlib_corpus(files: tuple[str, ...] | list[str] = DEFAULT_STDLIB_FILES, max_chars: int = 200_000) -> Tensor:
    """The concatenated sources as a 1-D ``long`` tensor of ASCII codes, cut to ``max_chars``.

    Raises:
        FileNotFoundError: naming the first file of ``files`` that this interpreter lacks.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for name in files:
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(f"load_stdlib_corpus: `files` entry {name!r} not found under {root}.")
        parts.append(path.read_text(encoding="utf-8", errors="replace"))
    data = "\n".join(parts).encode("ascii", errors="replace")[:max_chars]
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


class StdlibTextDataModule(LightningDataModule):
    """Non-overlapping character windows of the stdlib corpus; the last ``val_fraction`` is validation.

    Args:
        seq_len: characters per training window (the model predicts each next one). Default ``64``.
        batch_size: windows per batch and device. Default ``32``.
        max_chars: corpus length cap. Default ``200_000``.
        val_fraction: share of windows held out (from the end of the corpus), in (0, 1). Default ``0.1``.
        files: stdlib files to read. Default :data:`DEFAULT_STDLIB_FILES`.
    """

    vocab_size = VOCAB_SIZE

    def __init__(
        self, seq_len: int = 64, batch_size: int = 32, max_chars: int = 200_000, val_fraction: float = 0.1,
        files: tuple[str, ...] | list[str] = DEFAULT_STDLIB_FILES,
    ) -> None:
        super().__init__()
        check_int_at_least("StdlibTextDataModule", "seq_len", seq_len, 2)
        check_number("StdlibTextDataModule", "val_fraction", val_fraction, 0, 1, low_open=True, high_open=True)
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.max_chars = max_chars
        self.val_fraction = val_fraction
        self.files = tuple(files)
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        text = load_stdlib_corpus(self.files, self.max_chars)
        n = (len(text) - 1) // self.seq_len
        windows = text[: n * self.seq_len + 1]
        x = windows[:-1].reshape(n, self.seq_len)
        y = windows[1:].reshape(n, self.seq_len)
        n_val = max(1, int(n * self.val_fraction))
        self.train_set = TensorDataset(x[:-n_val], y[:-n_val])
        self.val_set = TensorDataset(x[-n_val:], y[-n_val:])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=128)


class CharTransformerLM(LightningModule):
    """A small decoder-only transformer (pre-norm, learned positions); logs ``train_loss`` and ``val_loss``.

    Args:
        vocab_size: characters. Default ``128``.
        seq_len: maximum context. Default ``64``.
        d_model: width. Default ``128``.
        n_layers: transformer blocks. Default ``2``.
        n_heads: attention heads. Default ``4``.
        lr: learning rate of the default optimizer (AdamW) used when the config names none. Default ``3e-3``.
    """

    def __init__(
        self, vocab_size: int = VOCAB_SIZE, seq_len: int = 64, d_model: int = 128, n_layers: int = 2,
        n_heads: int = 4, lr: float = 3e-3,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Parameter(torch.zeros(seq_len, d_model))
        layer = nn.TransformerEncoderLayer(
            d_model, n_heads, dim_feedforward=4 * d_model, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        self.lr = lr

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=idx.device)
        h = self.embed(idx) + self.pos[:t]
        return self.head(self.norm(self.blocks(h, mask=mask, is_causal=True)))

    def _loss(self, batch: Any) -> Tensor:
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch), prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)
