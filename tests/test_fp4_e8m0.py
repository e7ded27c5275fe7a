"""``conversion_core.formats.fp4`` and ``.e8m0`` against definitions written here from the OCP MX spec.

E2M1: nearest grid value by exhaustive distance, ties to the even code, sign kept; packing by a
plain loop. E8M0: the exponent by Python float arithmetic (``math.frexp``) from compressed-tensors'
rule "round the amax's significand up to the next power when it is >= 1.75, subtract the
element format's offset".
"""

from __future__ import annotations

import math

import pytest
import torch

from conversion_core.formats.e8m0 import (
    MXFP4_E2M1_OFFSET,
    MXFP8_E4M3_OFFSET,
    e8m0_reciprocal,
    e8m0_values,
    mx_scale_codes,
)
from conversion_core.formats.fp4 import (
    E2M1_GRID,
    e2m1_codes,
    e2m1_values,
    pack_e2m1,
    quantize_e2m1_into,
    unpack_e2m1,
)

GRID = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def reference_code(v: float) -> int:
    mag = min(abs(v), 6.0)
    dist = [abs(mag - g) for g in GRID]
    best = min(dist)
    ties = [i for i, d in enumerate(dist) if d == best]
    index = next((i for i in ties if i % 2 == 0), ties[0])
    return index | (8 if v < 0 else 0)  # -0.0 is code 0, as compressed-tensors writes it


def interesting_values() -> torch.Tensor:
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    eps = [-1e-6, 0.0, 1e-6]
    base = [t + e for t in ties for e in eps] + GRID + [6.5, 7.0, 1e30, 1e-30, 1e-45, 0.1, 2.9, 4.999]
    g = torch.Generator().manual_seed(0)
    rand = (torch.rand(2000, generator=g) * 8).tolist()
    vals = base + rand
    return torch.tensor(vals + [-v for v in vals] + [-0.0], dtype=torch.float32)


def test_e2m1_codes_match_nearest_even_definition():
    x = interesting_values()
    want = torch.tensor([reference_code(v) for v in x.tolist()], dtype=torch.uint8)
    assert torch.equal(e2m1_codes(x), want)


def test_e2m1_values_decode_every_code():
    codes = torch.arange(16, dtype=torch.uint8)
    got = e2m1_values(codes)
    assert got.tolist() == list(E2M1_GRID)
    assert torch.equal(torch.signbit(got), codes >= 8)
    signed = codes != 8
    assert torch.equal(e2m1_codes(got[signed]), codes[signed])  # every value is its own rounding
    assert int(e2m1_codes(got[8:9])) == 0


def test_pack_order_low_nibble_first_and_unpack_inverse():
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (3, 5, 8), generator=g, dtype=torch.uint8)
    packed = pack_e2m1(codes)
    assert packed.shape == (3, 5, 4)
    for idx in range(3 * 5):
        row = codes.reshape(15, 8)[idx].tolist()
        assert packed.reshape(15, 4)[idx].tolist() == [row[2 * i] + 16 * row[2 * i + 1] for i in range(4)]
    assert torch.equal(unpack_e2m1(packed), codes)


def test_quantize_e2m1_into_writes_packed_codes():
    x = interesting_values()[:4000].reshape(40, 100)
    out = torch.full((40, 50), 0xA5, dtype=torch.uint8)
    quantize_e2m1_into(x, out)
    assert torch.equal(out, pack_e2m1(e2m1_codes(x)))


def test_refusals():
    with pytest.raises(TypeError, match="float32"):
        e2m1_codes(torch.zeros(2, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="even"):
        pack_e2m1(torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8"):
        unpack_e2m1(torch.zeros(2, dtype=torch.int32))


def reference_scale_code(amax: float, offset: int) -> int:
    if amax == 0.0:
        return 0
    mantissa, exponent = math.frexp(amax)  # amax = mantissa * 2**exponent, mantissa in [0.5, 1)
    power = exponent - 1 + (1 if mantissa >= 0.875 else 0)  # significand 2*mantissa >= 1.75
    if amax < 2.0**-126:  # compressed-tensors masks the float bits: a subnormal rounds to 0 or 2**-126
        power = -126 if amax + 2.0**-128 >= 2.0**-126 else None
        if power is None:
            return 0
    return max(0, min(254, 127 + power - offset))


@pytest.mark.parametrize("offset", [MXFP8_E4M3_OFFSET, MXFP4_E2M1_OFFSET])
def test_mx_scale_codes_match_definition(offset):
    g = torch.Generator().manual_seed(2)
    mags = torch.randn(3000, generator=g).abs() * torch.exp2(torch.randint(-140, 128, (3000,), generator=g).float())
    edges = [1.75 * 2.0**k for k in range(-120, 127)] + [2.0**k for k in range(-126, 128)]
    edges += [math.nextafter(e, 0.0) for e in edges]
    special = [0.0, 1e-45, 2.0**-127, 2.0**-126, float(torch.finfo(torch.float32).max), 448.0, 6.0]
    amax = torch.cat([mags, torch.tensor(edges + special)]).float()
    amax = amax[torch.isfinite(amax)]
    want = torch.tensor([reference_scale_code(a, offset) for a in amax.tolist()], dtype=torch.uint8)
    assert torch.equal(mx_scale_codes(amax, offset), want)


def test_e8m0_values_and_reciprocal_are_exact_powers():
    codes = torch.arange(255, dtype=torch.uint8)
    values = e8m0_values(codes)
    assert values.tolist() == [2.0 ** (c - 127) for c in range(255)]
    assert e8m0_reciprocal(codes).tolist() == [2.0 ** (127 - c) for c in range(255)]
