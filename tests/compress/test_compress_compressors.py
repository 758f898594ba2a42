"""Compressors: hand-computed cases, properties (contraction, unbiasedness), wire sizes, seeding, bad arguments."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_convergence.compress import QSGD, Compose, Identity, RandK, ScaledSign, TopK, generator_for
from lightning_convergence.compress.base import pack_bits, unpack_bits

X4 = torch.tensor([3.0, -1.0, 0.5, -4.0])


def test_topk_hand_computed_keeps_largest_magnitudes():
    p = TopK(k_fraction=0.5).compress(X4)
    assert torch.equal(p.decompress(), torch.tensor([3.0, 0.0, 0.0, -4.0]))
    assert p.nbytes == 2 * 4 + 2 * 4  # two float32 values + two int32 indices


@pytest.mark.parametrize("k_fraction", [0.01, 0.1, 0.37, 1.0])
def test_topk_is_a_contraction(k_fraction):
    gen = torch.Generator().manual_seed(0)
    comp = TopK(k_fraction)
    for d in (1, 7, 100, 1000):
        x = torch.randn(d, generator=gen)
        err = (comp.compress(x).decompress() - x).pow(2).sum()
        k = comp.k_for(d)
        # exact inequality up to float32 summation error
        assert err <= (1 - k / d) * x.pow(2).sum() + 1e-5
        assert comp.contraction(d) == k / d >= k_fraction


def test_randk_is_unbiased_and_shares_indices():
    x = torch.linspace(-2.0, 3.0, 20)
    comp = RandK(k_fraction=0.25, rescale=True, seed=3)
    n = 4000
    mean = sum(comp.compress(x, step=s, key="w").decompress() for s in range(n)) / n
    # per-entry std of the mean is |x_j| * sqrt((d/k - 1) / n) <= 3 * sqrt(3/4000) ~ 0.08; 0.35 is > 4 sigma
    assert torch.allclose(mean, x, atol=0.35)
    assert (mean - x).abs().mean() < 0.1  # the average error is far smaller than the worst entry
    # same (seed, step, key) -> same indices on every rank; other steps or keys -> other draws
    a, b = comp.indices(20, 5, "w"), RandK(0.25, seed=3).indices(20, 5, "w")
    assert torch.equal(a, b)
    assert not torch.equal(a, comp.indices(20, 6, "w")) or not torch.equal(a, comp.indices(20, 5, "v"))
    p = comp.compress(x, 1, "w")
    assert p.nbytes == 5 * 4  # only the values travel
    assert comp.summable and comp.unbiased and comp.alpha == 0.0


def test_randk_without_rescale_contracts_in_expectation():
    x = torch.linspace(-2.0, 3.0, 20)
    comp = RandK(k_fraction=0.25, rescale=False)
    errs = [(comp.compress(x, s, "w").decompress() - x).pow(2).sum() for s in range(2000)]
    expected = (1 - 5 / 20) * x.pow(2).sum()
    assert abs(sum(errs) / len(errs) - expected) / expected < 0.05  # Monte-Carlo error ~1% at 2000 draws


def test_compressors_do_not_touch_the_global_rng():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    RandK(0.5).compress(torch.randn(10, generator=torch.Generator().manual_seed(0)), 3, "w")
    QSGD(3).compress(torch.ones(10), 3, "w")
    assert torch.equal(before, torch.get_rng_state())


def test_generator_for_is_stable():
    a = torch.rand(3, generator=generator_for(1, 2, "x"))
    b = torch.rand(3, generator=generator_for(1, 2, "x"))
    c = torch.rand(3, generator=generator_for(1, 3, "x"))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_scaled_sign_hand_computed():
    p = ScaledSign().compress(X4)
    scale = (3 + 1 + 0.5 + 4) / 4
    assert torch.allclose(p.decompress(), torch.tensor([scale, -scale, scale, -scale]))
    assert p.nbytes == 4 + 1  # float32 scale + 4 sign bits in one byte
    assert ScaledSign().compress(torch.randn(1000)).nbytes == 4 + 125


def test_sign_contraction_lower_bound():
    x = torch.randn(257, generator=torch.Generator().manual_seed(1))
    err = (ScaledSign().compress(x).decompress() - x).pow(2).sum()
    assert err <= (1 - ScaledSign().contraction(257)) * x.pow(2).sum() + 1e-5


@pytest.mark.parametrize(("levels", "bits"), [(1, 2), (3, 4), (7, 4), (8, 8), (127, 8)])
def test_qsgd_unbiased_and_wire_size(levels, bits):
    x = torch.tensor([0.3, -1.2, 2.0, 0.0, -0.7])
    comp = QSGD(levels=levels)
    assert comp.bits_per_entry == bits
    p = comp.compress(x, 0, "w")
    assert p.nbytes == 4 + math.ceil(5 * bits / 8)
    n = 3000
    mean = sum(comp.compress(x, s, "w").decompress() for s in range(n)) / n
    # variance per entry <= ||x||^2 / (4 s^2) per draw; ||x|| ~ 2.5 -> std of mean <= 1.25/sqrt(3000) ~ 0.023
    assert torch.allclose(mean, x, atol=0.12)


def test_qsgd_ternary_values_and_terngrad_norm():
    x = torch.tensor([1.0, -2.0, 0.5, 0.0])
    for norm, scale in (("l2", x.norm()), ("max", torch.tensor(2.0))):
        out = QSGD(levels=1, norm=norm).compress(x, 4, "w").decompress()
        mags = out.abs()
        assert torch.all((mags == 0) | torch.isclose(mags, scale.expand_as(mags)))
        assert out[3] == 0  # zero stays zero
    # with 127 levels and the max norm, max entry is exact and the rest within one level
    out = QSGD(levels=127, norm="max").compress(x).decompress()
    assert torch.allclose(out, x, atol=2.0 / 127)


def test_compose_topk_then_8bit():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(2))
    comp = Compose(TopK(0.01), QSGD(levels=127, norm="max"))
    p = comp.compress(x, 0, "w")
    assert p.nbytes == 10 * 4 + 4 + 10  # int32 indices + one norm + 10 8-bit codes
    top = TopK(0.01).compress(x).decompress()
    out = p.decompress()
    assert torch.equal(out != 0, top != 0)
    assert torch.allclose(out, top, atol=top.abs().max().item() / 127)
    assert comp.alpha == 0.0 and not comp.summable
    assert Compose(RandK(0.1), Identity()).summable


def test_identity_round_trip():
    x = torch.randn(3, 4)
    p = Identity().compress(x)
    assert torch.equal(p.decompress(), x) and p.nbytes == 48


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_pack_bits_round_trip(bits):
    codes = torch.randint(0, 2**bits, (37,), generator=torch.Generator().manual_seed(bits))
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(37 * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, 37), codes)


@pytest.mark.parametrize(
    ("factory", "exc", "match"),
    [
        (lambda: TopK(k_fraction=0), ValueError, "k_fraction"),
        (lambda: TopK(k_fraction=-0.1), ValueError, "k_fraction"),
        (lambda: TopK(k_fraction=1.5), ValueError, "k_fraction"),
        (lambda: TopK(k_fraction="0.1"), TypeError, "k_fraction"),
        (lambda: RandK(k_fraction=0.0), ValueError, "k_fraction"),
        (lambda: RandK(k_fraction=2), ValueError, "k_fraction"),
        (lambda: QSGD(levels=0), ValueError, "levels"),
        (lambda: QSGD(levels=128), ValueError, "levels"),
        (lambda: QSGD(levels=1.5), TypeError, "levels"),
        (lambda: QSGD(norm="l1"), ValueError, "norm"),
        (lambda: Compose(TopK(), "QSGD"), TypeError, "second"),
        (lambda: pack_bits(torch.zeros(3), 3), ValueError, "bits"),
    ],
)
def test_bad_arguments_fail_at_construction(factory, exc, match):
    with pytest.raises(exc, match=f"`{match}`"):
        factory()


def test_yaml_ints_are_accepted():
    assert TopK(k_fraction=1).k_fraction == 1.0
