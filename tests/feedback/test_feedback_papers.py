"""EF21-SGDM and EControl against the papers' algorithms with the model iterate (tests/reference/ef_papers.py), the
first-step initialisation by hand, and the EControl paper's heterogeneous least-squares experiment in small."""

from __future__ import annotations

import pytest
import torch

from lightning_convergence.compress import TopK
from lightning_convergence.feedback import EF14, EF21, EF21SGDM, EControl
from tests.reference.ef_papers import econtrol_paper, ef14_paper, ef21_sgdm_paper

N, D, M = 4, 20, 30
COMP = TopK(k_fraction=0.1)  # deterministic: the same C in both loops


def _problem(seed: int = 0, sigma: float = 0.0, steps: int = 400):
    """Heterogeneous least squares: f_i(x) = ||A_i x − b_i||² / (2M), every worker with its own optimum."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(N, M, D, generator=gen, dtype=torch.float64)
    x_star_i = 3.0 * torch.randn(N, D, generator=gen, dtype=torch.float64)  # far-apart local optima
    b = torch.einsum("nmd,nd->nm", a, x_star_i)
    noise = sigma * torch.randn(steps + 1, N, D, generator=gen, dtype=torch.float64)

    def grad(i: int, x: torch.Tensor, t: int) -> torch.Tensor:
        full = a[i].T @ (a[i] @ x - b[i]) / M
        return full + noise[t, i] if sigma else full

    x_opt = torch.linalg.lstsq(a.reshape(N * M, D), b.reshape(N * M, 1)).solution.reshape(D)
    return grad, x_opt


def _ours(make, grad, gamma: float, steps: int) -> list[torch.Tensor]:
    """Drive one rule per worker with a fake all-reduce (the mean of the decompressed messages)."""
    rules = [make() for _ in range(N)]
    x, iterates = torch.zeros(D, dtype=torch.float64), []
    for t in range(steps):
        msgs = [r.message("w", grad(i, x, t).float(), COMP).decompress() for i, r in enumerate(rules)]
        mean = sum(msgs) / N
        est = [r.update("w", mean) for r in rules][0]
        x = x - gamma * est.double()
        iterates.append(x.clone())
    return iterates


def _c(v: torch.Tensor) -> torch.Tensor:
    return COMP.compress(v.float(), 0, "w").decompress().double()


def test_ef21_sgdm_without_dense_first_step_compresses_the_first_gradient():
    # v_i⁰ = ∇f_i(x⁰) (the paper's initialisation), g_i⁻¹ = 0: the first message is C(∇f), not C(η∇f).
    g = torch.tensor([4.0, -1.0, 0.5, 2.0])
    payload = EF21SGDM(momentum=0.1, dense_first_step=False).message("w", g, TopK(k_fraction=0.5))
    assert payload.decompress().tolist() == [4.0, 0.0, 0.0, 2.0]


@pytest.mark.parametrize("dense", [True, False], ids=["g0_gradient", "g0_zero"])
def test_ef21_sgdm_iterates_equal_the_papers_algorithm(dense):
    grad, _ = _problem(sigma=0.5, steps=60)
    ref = ef21_sgdm_paper(torch.zeros(D, dtype=torch.float64), grad, N, _c, gamma=0.05, eta=0.2, steps=60,
                          g_init="gradient" if dense else "zero")
    got = _ours(lambda: EF21SGDM(momentum=0.2, dense_first_step=dense), grad, gamma=0.05, steps=60)
    for t, (a, b) in enumerate(zip(ref, got)):
        # our state is float32, the transcription float64: 60 steps of float32 rounding on iterates of size ~3
        assert torch.allclose(a, b, atol=1e-4), (t, (a - b).abs().max())


def test_econtrol_iterates_equal_the_papers_algorithm():
    grad, _ = _problem(sigma=0.5, steps=60)
    ref = econtrol_paper(torch.zeros(D, dtype=torch.float64), grad, N, _c, gamma=0.05, eta=0.3, steps=60)
    got = _ours(lambda: EControl(eta=0.3), grad, gamma=0.05, steps=60)
    for t, (a, b) in enumerate(zip(ref, got)):
        assert torch.allclose(a, b, atol=1e-4), (t, (a - b).abs().max())  # float32 state, as above


def test_heterogeneous_least_squares_ef14_stalls_econtrol_and_ef21_reach_the_optimum():
    """The EControl paper's first experiment in small: full local gradients, far-apart local optima, Top-10%."""
    grad, x_opt = _problem()
    steps, gamma = 3000, 0.05
    dist = {}
    for name, make in (("ef14", EF14), ("econtrol", lambda: EControl(eta=0.1)), ("ef21", EF21)):
        x = _ours(make, grad, gamma, steps)[-1]
        dist[name] = (x - x_opt).norm().item() / x_opt.norm().item()
    ref_ef14 = ef14_paper(torch.zeros(D, dtype=torch.float64), grad, N, _c, gamma, steps)[-1]
    # EF14 cannot rest at x*: each worker's ∇f_i(x*) ≠ 0 is dense, and a Top-K message of it never equals it.
    assert dist["ef14"] > 1e-2
    assert (ref_ef14 - x_opt).norm().item() / x_opt.norm().item() > 1e-2  # the transcription stalls alike
    # The shifts h_i learn ∇f_i(x*): linear convergence to the least-squares solution (float32 state: 1e-4).
    assert dist["econtrol"] < 1e-4
    assert dist["ef21"] < 1e-4
