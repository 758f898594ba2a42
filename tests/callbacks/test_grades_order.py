"""GradES measures its signal after the optimizer step by default (the official code's ``on_step_end``); the
paper-ordered ``measure_at="before_step"`` freezes one update earlier. Both orders are checked against updates
worked out by hand on one 1×2 matrix under plain SGD (lr 1), where each step's gradient is the batch itself."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_convergence.callbacks.gradient_early_stopping import GradientEarlyStopping

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class _Scripted(L.LightningModule):
    """loss = Σ W ⊙ x, so ∇W = x: the gradient of step k is the k-th row of the data, in order."""

    def __init__(self, rows: list[list[float]]) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1, 2))
        self.rows = torch.tensor(rows)

    def training_step(self, batch, batch_idx):
        return (self.w * batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.rows), batch_size=1, shuffle=False)


def _fit(rows: list[list[float]], **kwargs) -> tuple[GradientEarlyStopping, torch.Tensor]:
    cb = GradientEarlyStopping(tau=0.5, grace_fraction=0.0, total_steps=4, stop_training=False, **kwargs)
    module = _Scripted(rows)
    L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[cb]).fit(module)
    return cb, module.w.detach()


def test_default_order_is_after_the_optimizer_step():
    assert GradientEarlyStopping().measure_at == "after_step"


# Gradient signal, gradients [1,1], [.1,.1], [.1,.1], [.1,.1]; τ = 0.5 on the L1 norm.
# after_step: step 1 applies [1,1] (W = -[1,1]), check 1 sees ‖[1,1]‖₁ = 2; step 2 applies [.1,.1]
#   (W = -[1.1,1.1]), check 2 sees 0.2 < τ and freezes: W stays -[1.1,1.1], frozen at step 2.
# before_step: check 0 sees 2, step 1 applies [1,1]; check 1 sees 0.2 < τ, freezes and drops that very
#   gradient: W stays -[1,1], frozen at step 1.
@pytest.mark.parametrize(("measure_at", "frozen_at", "w"), [("after_step", 2, -1.1), ("before_step", 1, -1.0)])
def test_grad_signal_order_against_hand_computation(measure_at, frozen_at, w):
    cb, weight = _fit([[1, 1]] + [[0.1, 0.1]] * 3, signal="grad", measure_at=measure_at)
    assert cb.core.frozen == {"w": frozen_at}
    # float32 sums of 1 and 0.1: a few ulps.
    torch.testing.assert_close(weight, torch.full((1, 2), w), rtol=0, atol=1e-6)


# Weight-change signal, gradients [.1,.1], [1,1], [1,1], [1,1]; τ = 0.5.
# before_step: check 0 caches W₀ = 0; step 1 moves W by [.1,.1]; check 1 sees ‖W₁ − W₀‖₁ = 0.2 < τ and freezes
#   before step 2: W stays -[.1,.1].
# after_step (official): check 1 caches W₁ = -[.1,.1] (no signal); checks 2, 3, 4 each see a change of 2 > τ:
#   nothing freezes and W ends at -[3.1,3.1].
@pytest.mark.parametrize(("measure_at", "frozen", "w"), [("after_step", {}, -3.1), ("before_step", {"w": 1}, -0.1)])
def test_weight_change_signal_order_against_hand_computation(measure_at, frozen, w):
    cb, weight = _fit([[0.1, 0.1]] + [[1, 1]] * 3, signal="weight_change", measure_at=measure_at)
    assert cb.core.frozen == frozen
    torch.testing.assert_close(weight, torch.full((1, 2), w), rtol=0, atol=1e-6)  # float32: a few ulps


def test_measure_at_is_checked():
    with pytest.raises(ValueError, match="GradientEarlyStopping: `measure_at` must be one of"):
        GradientEarlyStopping(measure_at="during_step")
