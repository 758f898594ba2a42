"""Reference twins: literal transcriptions of the update rules (ALGORITHMS.md §1, §2) over whole vectors and all
workers at once; the per-parameter rule cores must match them for 50 seeded steps with a fake all-reduce."""

from __future__ import annotations

import pytest
import torch

from lightning_convergence.compress import RandK, TopK
from lightning_convergence.feedback import EF14, EF21, EF21SGDM, EControl

N, D, STEPS = 3, 16, 50


def C(compressor, x, step):  # the paper's symbol
    return compressor.compress(x, step, "w").decompress()


def reference(rule: str, grads, compressor, eta=0.1, momentum=0.2, variant="accumulate"):
    """Returns the sequence of gradient estimates the optimizer would see."""
    out = []
    g_i = [grads[0][i].clone() for i in range(N)]  # EF21 family: g_i^0 = grad_i(x^0), sent uncompressed
    g = sum(g_i) / N
    v = [x.clone() for x in g_i]
    e = [torch.zeros(D) for _ in range(N)]
    h_i, h = [x.clone() for x in g_i], g.clone()
    out.append(g.clone() if rule != "ef14" else None)
    for t in range(1, STEPS):
        gr = grads[t]
        if rule == "ef21":
            c = [C(compressor, gr[i] - g_i[i], t) for i in range(N)]
            g_i = [g_i[i] + c[i] for i in range(N)]
            g = g + sum(c) / N
            out.append(g.clone())
        elif rule == "ef21_sgdm":
            v = [(1 - momentum) * v[i] + momentum * gr[i] for i in range(N)]
            c = [C(compressor, v[i] - g_i[i], t) for i in range(N)]
            g_i = [g_i[i] + c[i] for i in range(N)]
            g = g + sum(c) / N
            out.append(g.clone())
        elif rule == "econtrol":
            delta = [C(compressor, eta * e[i] + gr[i] - h_i[i], t) for i in range(N)]
            if variant == "accumulate":
                e = [e[i] + gr[i] - h_i[i] - delta[i] for i in range(N)]
            else:
                e = [eta * e[i] + gr[i] - h_i[i] - delta[i] for i in range(N)]
            h_i = [h_i[i] + delta[i] for i in range(N)]
            h = h + sum(delta) / N
            out.append(h.clone())
    return out


def reference_ef14(grads, compressor):
    e = [torch.zeros(D) for _ in range(N)]
    out = []
    for t in range(STEPS):
        p = [grads[t][i] + e[i] for i in range(N)]
        c = [C(compressor, p[i], t) for i in range(N)]
        e = [p[i] - c[i] for i in range(N)]
        out.append(sum(c) / N)
    return out


def fast(make, grads, compressor):
    rules = [make() for _ in range(N)]
    out = []
    for t in range(STEPS):
        mean = sum(r.message("w", grads[t][i], compressor).decompress() for i, r in enumerate(rules)) / N
        outs = [r.update("w", mean) for r in rules]
        out.append(outs[0])
    return out


@pytest.mark.parametrize("compressor", [TopK(0.25), RandK(0.25, rescale=False, seed=4)], ids=["topk", "randk"])
@pytest.mark.parametrize(
    ("rule", "make", "kw"),
    [
        ("ef21", EF21, {}),
        ("ef21_sgdm", lambda: EF21SGDM(momentum=0.2), {"momentum": 0.2}),
        ("econtrol", lambda: EControl(eta=0.3), {"eta": 0.3}),
        ("econtrol", lambda: EControl(eta=0.3, error_update="input"), {"eta": 0.3, "variant": "input"}),
        ("ef14", EF14, {}),
    ],
)
def test_fast_core_matches_literal_reference(rule, make, kw, compressor):
    gen = torch.Generator().manual_seed(7)
    grads = [[torch.randn(D, generator=gen) for _ in range(N)] for _ in range(STEPS)]
    ref = reference_ef14(grads, compressor) if rule == "ef14" else reference(rule, grads, compressor, **kw)
    got = fast(make, grads, compressor)
    for t, (a, b) in enumerate(zip(ref, got)):
        # different summation order only: float32 rounding accumulated over 50 steps
        assert torch.allclose(a, b, atol=1e-4), (t, (a - b).abs().max())
