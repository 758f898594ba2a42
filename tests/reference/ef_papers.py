"""EF21-SGDM and EControl as the papers write them, with the model iterate, on a distributed least-squares problem.

Transcribed slowly and literally (whole vectors, all workers in one process):

* EF21-SGDM: Fatkhullin, Tyurin, Richtárik, NeurIPS 2023 (arXiv:2305.15155), Algorithm 1, in the restatement of
  Khirirat, Riabinin, Sadiev, Gorbunov, Richtárik (*Error Feedback under (L0,L1)-Smoothness*, Algorithm 2 without
  the normalisation): ``v_i⁻¹ = ∇f_i(x⁰; ξ⁰)``; every step ``v_i ← (1−η)v_i + η∇f_i(x; ξ)``,
  ``Δ_i = C(v_i − g_i)``, ``g_i ← g_i + Δ_i``, ``x ← x − γ·mean_i g_i``. ``g_init="gradient"`` is the original
  paper's ``g_i⁰ = v_i⁰`` (sent in full); ``"zero"`` is ``g_i⁻¹ = 0``.
* EControl: Gao, Islamov, Stich, ICLR 2024 (arXiv:2311.05645), Algorithm 1 as its update is stated by the paper's
  summary and an independent reimplementation: ``e_i⁰ = 0``, ``h_i⁰ = ∇f_i(x⁰)``; ``Δ_i = C(η e_i + g_i − h_i)``,
  ``e_i ← e_i + g_i − h_i − Δ_i``, ``h_i ← h_i + Δ_i``, ``x ← x − γ (h + mean_i Δ_i)``, ``h ← h + mean_i Δ_i``.
* EF14 (Seide et al. 2014): ``p_i = g_i + e_i``, ``Δ_i = C(p_i)``, ``e_i ← p_i − Δ_i``, ``x ← x − γ·mean_i Δ_i``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Grad = Callable[[int, torch.Tensor, int], torch.Tensor]  # (worker, x, step) -> stochastic gradient
Compress = Callable[[torch.Tensor], torch.Tensor]


def ef21_sgdm_paper(x0: torch.Tensor, grad: Grad, n: int, compress: Compress, gamma: float, eta: float, steps: int,
                    g_init: str = "gradient") -> list[torch.Tensor]:
    """The iterates ``x¹ … x^steps``."""
    x = x0.clone()
    first = [grad(i, x, 0) for i in range(n)]
    v = [f.clone() for f in first]  # v_i⁻¹ (the paper: v_i⁰) = ∇f_i(x⁰; ξ⁰)
    iterates = []
    if g_init == "gradient":  # g_i⁰ = v_i⁰, sent uncompressed; x¹ = x⁰ − γ g⁰
        g_i = [f.clone() for f in first]
        x = x - gamma * sum(g_i) / n
        iterates.append(x.clone())
        start = 1
    else:  # g_i⁻¹ = 0: step 0 already compresses v_i⁰ (the same sample as v_i⁻¹, so v_i⁰ = v_i⁻¹)
        g_i = [torch.zeros_like(x0) for _ in range(n)]
        start = 0
    for t in range(start, steps):
        for i in range(n):
            sample = first[i] if t == 0 else grad(i, x, t)
            v[i] = (1 - eta) * v[i] + eta * sample
            g_i[i] = g_i[i] + compress(v[i] - g_i[i])
        x = x - gamma * sum(g_i) / n
        iterates.append(x.clone())
    return iterates


def econtrol_paper(x0: torch.Tensor, grad: Grad, n: int, compress: Compress, gamma: float, eta: float,
                   steps: int) -> list[torch.Tensor]:
    x = x0.clone()
    h_i = [grad(i, x, 0) for i in range(n)]
    e = [torch.zeros_like(x0) for _ in range(n)]
    h = sum(h_i) / n
    x = x - gamma * h  # t = 0: g⁰ = h⁰, so Δ⁰ = C(0) = 0
    iterates = [x.clone()]
    for t in range(1, steps):
        deltas = []
        for i in range(n):
            g = grad(i, x, t)
            d = compress(eta * e[i] + g - h_i[i])
            e[i] = e[i] + g - h_i[i] - d
            h_i[i] = h_i[i] + d
            deltas.append(d)
        mean_delta = sum(deltas) / n
        x = x - gamma * (h + mean_delta)
        h = h + mean_delta
        iterates.append(x.clone())
    return iterates


def ef14_paper(x0: torch.Tensor, grad: Grad, n: int, compress: Compress, gamma: float,
               steps: int) -> list[torch.Tensor]:
    x = x0.clone()
    e = [torch.zeros_like(x0) for _ in range(n)]
    iterates = []
    for t in range(steps):
        deltas = []
        for i in range(n):
            p = grad(i, x, t) + e[i]
            d = compress(p)
            e[i] = p - d
            deltas.append(d)
        x = x - gamma * sum(deltas) / n
        iterates.append(x.clone())
    return iterates
