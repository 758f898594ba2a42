"""The example tasks: data is deterministic and offline, the known optimum is right, and the models learn."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything

from lightning_convergence.examples import (
    CharTransformerLM,
    LinearModel,
    StdlibTextDataModule,
    SyntheticRegressionDataModule,
    load_stdlib_corpus,
)


def test_stdlib_corpus_is_deterministic_ascii():
    a, b = load_stdlib_corpus(max_chars=5000), load_stdlib_corpus(max_chars=5000)
    assert torch.equal(a, b) and len(a) == 5000 and int(a.max()) < 128
    with pytest.raises(FileNotFoundError, match="no_such_module.py"):
        load_stdlib_corpus(("no_such_module.py",))


def test_least_squares_optimum_is_the_minimiser():
    dm = SyntheticRegressionDataModule(n_samples=256, dim=4, noise_std=0.3)
    w = dm.optimum.double().requires_grad_(True)
    loss = ((dm.x.double() @ w - dm.y.double()) ** 2).mean()
    (grad,) = torch.autograd.grad(loss, w)
    assert grad.abs().max() < 1e-5  # zero gradient at the optimum, up to its float32 rounding


def test_sgd_reaches_the_known_optimum():
    seed_everything(0)
    dm = SyntheticRegressionDataModule(n_samples=512, dim=4, noise_std=0.1, batch_size=512, shuffle=False)
    model = LinearModel(4, lr=0.3)
    Trainer(accelerator="cpu", max_steps=200, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, limit_val_batches=0).fit(model, dm)
    torch.testing.assert_close(model.linear.weight.detach().squeeze(0), dm.optimum, atol=1e-4, rtol=0)


def test_char_lm_learns():
    seed_everything(0)
    dm = StdlibTextDataModule(seq_len=32, batch_size=16, max_chars=20_000)
    model = CharTransformerLM(seq_len=32, d_model=32, n_layers=1, n_heads=2, lr=3e-3)
    dm.setup()
    x, y = dm.train_set[:16]
    before = model._loss((x, y)).item()
    Trainer(accelerator="cpu", max_steps=40, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, limit_val_batches=0).fit(model, dm)
    after = model._loss((x, y)).item()
    assert before > 4.0 and after < before - 1.0  # from ~ln(128)=4.85 to clearly better than uniform
