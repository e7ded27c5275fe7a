"""The installed conversion-core-mx distribution: bytes, kit, tags, refusals, its rules.

Needs only conversion-core and this plugin. The conversions come from the registry (entry points
really discovered). Bytes are checked against a group-by-group reference written here from the
format's definition: Python-float exponent arithmetic (``math.frexp``) for the E8M0 byte,
``conversion_core.testing.e4m3_reference_bytes`` for e4m3 and a nearest-value search for e2m1.

Error bounds for the kit, derived (``v = x / s`` is exact: ``s`` is a power of two):

- MXFP8: e4m3 has 3 mantissa bits, so for normal ``|v| >= 2**-6`` rounding moves ``v`` by at most
  ``2**-4 |v|``; subnormal spacing ``2**-9`` gives at most ``2**-10``; the scale exponent keeps
  ``|v| < 448`` (no clipping), and ``q * s`` is exact. ``|d - x| <= 2**-4 |x| + 2**-10 s``.
- MXFP4: e2m1 has 1 mantissa bit: for ``|v| >= 1`` the spacing is at most ``|v| / 2``, so rounding
  moves ``v`` by at most ``2**-2 |v|``; below 1 the spacing is 0.5, at most 0.25; values in
  ``(6, 7)`` (the exponent choice allows ``|v| < 7``) clip to 6, an error below ``|v| / 6``.
  ``|d - x| <= 2**-2 |x| + 2**-2 s``.
- The saturating top scale (an amax ``>= 1.75 * 2**127``, the kit's huge values) clips to
  ``1.875 * 2**127`` (e4m3) or ``1.5 * 2**127`` (e2m1): within the same relative bounds.
"""

from __future__ import annotations

import math

import pytest
import torch

import conversion_core as cc
from conversion_core.testing import CHECKS, ErrorBound, check_conversion, e4m3_reference_bytes

SHAPES = [(16, 64), (130, 96), (2, 33, 160), (1, 32)]
GRID = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
OFFSET = {"mxfp8": 8, "mxfp4": 2}
QMAX = {"mxfp8": 448.0, "mxfp4": 6.0}
SATURATE = {"mxfp8": 15.0 * 2.0**124, "mxfp4": 3.0 * 2.0**126}


@pytest.fixture(scope="module")
def registry() -> cc.Registry:
    registry = cc.load_registry(reload=True)
    assert {"mxfp8", "mxfp4"} <= set(registry.names()), "is conversion-core-mx installed?"
    return registry


def _element_scale(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.exp2(scale.double() - 127).float().repeat_interleave(32, dim=-1)


BOUNDS = {
    "mxfp8": ErrorBound(relative=2.0**-4, scale_units=2.0**-10),
    "mxfp4": ErrorBound(relative=2.0**-2, scale_units=2.0**-2, element_scale=_element_scale),
}


@pytest.mark.parametrize("name", ["mxfp8", "mxfp4"])
@pytest.mark.parametrize("check", CHECKS)
def test_conformance_kit(registry, name, check):
    check_conversion(registry.get(name), error_bound=BOUNDS[name], shapes=SHAPES, only=[check])


def ref_byte(amax: float, offset: int) -> int:
    """compressed-tensors' exponent: the amax's power of two, one up when the significand is >= 1.75."""
    if amax < 2.0**-126:
        return 0
    mantissa, exponent = math.frexp(amax)
    power = exponent - 1 + (1 if mantissa >= 0.875 else 0)
    return max(0, min(254, 127 + power - offset))


def ref_e2m1(v: float) -> int:
    mag = abs(v)
    dist = [abs(mag - g) for g in GRID]
    best = min(dist)
    index = min((i for i, d in enumerate(dist) if d == best), key=lambda i: (i % 2, i))
    return index | (8 if v < 0 else 0)


def reference(name: str, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Group by group: (value bytes, scale bytes)."""
    x = src.detach().float().reshape(-1, src.shape[-1])
    rows, k = x.shape
    scales = torch.empty(rows, k // 32, dtype=torch.uint8)
    values = []
    for r in range(rows):
        row = []
        for g in range(k // 32):
            group = x[r, g * 32 : (g + 1) * 32]
            byte = ref_byte(float(group.abs().max()), OFFSET[name])
            scales[r, g] = byte
            scale = 2.0 ** (byte - 127)
            limit = min(QMAX[name], SATURATE[name] / scale)
            v = [max(-limit, min(limit, float(e) / scale)) for e in group.tolist()]
            row.extend(v)
        values.append(row)
    v = torch.tensor(values, dtype=torch.float32)
    if name == "mxfp8":
        q = e4m3_reference_bytes(v)
    else:
        codes = torch.tensor([[ref_e2m1(e) for e in r] for r in v.tolist()], dtype=torch.uint8)
        q = codes[:, 0::2] | (codes[:, 1::2] << 4)
    lead = tuple(src.shape[:-1])
    return q.reshape(*lead, -1), scales.reshape(*lead, -1)


def weights(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Magnitudes across decades, a zero group, an outlier, values on e2m1 ties and scale edges."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-12, 8, shape, generator=g).float())
    flat = x.view(-1, shape[-1])
    flat[0, :32] = 0.0
    flat[-1, 5] = 3.0e4
    flat[min(1, flat.shape[0] - 1), :8] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0]) * 2.0**-3
    flat[min(2, flat.shape[0] - 1), 32:34] = torch.tensor([1.75 * 2.0**3, -0.0]) if shape[-1] > 32 else 0.0
    return x.to(dtype)


@pytest.mark.parametrize("name", ["mxfp8", "mxfp4"])
@pytest.mark.parametrize("shape", [(3, 64), (17, 96), (2, 5, 64), (1, 32)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_bytes_match_group_reference(registry, name, shape, dtype):
    src = weights(shape, dtype, seed=len(shape) * 7 + shape[-1])
    q, s = registry.get(name).convert(src)
    want_q, want_s = reference(name, src)
    assert torch.equal(s, want_s)
    assert torch.equal(q.view(torch.uint8), want_q)


@pytest.mark.parametrize("name", ["mxfp8", "mxfp4"])
def test_huge_values_saturate_finite(registry, name):
    big = float(torch.finfo(torch.bfloat16).max)
    src = torch.full((2, 64), big, dtype=torch.bfloat16)
    src[1] = -big
    conversion = registry.get(name)
    q, s = conversion.convert(src)
    want_q, want_s = reference(name, src)
    assert torch.equal(s, want_s) and torch.equal(q.view(torch.uint8), want_q)
    assert torch.isfinite(conversion.dequantize(q, s)).all()


@pytest.mark.parametrize("name", ["mxfp8", "mxfp4"])
@pytest.mark.parametrize("k", [48, 33, 257])
def test_k_not_a_multiple_of_32_is_refused(registry, name, k):
    conversion = registry.get(name)
    why = "not a multiple of the MX group size 32|has an odd K"  # MXFP4 packs pairs: an odd K fails first
    with pytest.raises(cc.ConversionInputError, match=why):
        conversion.convert(torch.ones(4, k, dtype=torch.bfloat16))
    with pytest.raises(cc.ConversionInputError, match=why):
        conversion.allocate((4, k))


@pytest.mark.parametrize("name", ["mxfp8", "mxfp4"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_refused_before_writing(registry, name, bad):
    conversion = registry.get(name)
    src = torch.ones(3, 2, 64, dtype=torch.bfloat16)
    src[2, 1, 63] = bad
    q, s = conversion.allocate(src.shape)
    q.view(torch.uint8).fill_(0x5A)
    s.fill_(0x5A)
    with pytest.raises(cc.ConversionInputError, match=r"\(3, 2, 64\) holds NaN or Inf"):
        conversion.fn(src, q, s)
    assert bool((q.view(torch.uint8) == 0x5A).all()) and bool((s == 0x5A).all())


def test_tags_distinguish_the_formats(registry):
    t8, t4 = registry.get("mxfp8").tags, registry.get("mxfp4").tags
    assert t8["compile_target"] != t4["compile_target"]
    assert t8["compile_metadata"]["scale_dtype"] == "e8m0" and t8["compile_metadata"]["group_size"] == 32
    assert not cc.accepts(t4, [t8["compile_target"]])
    fp8 = registry.get("fp8_128x128_ue8m0").tags["compile_target"] if "fp8_128x128_ue8m0" in registry.names() else None
    assert fp8 not in (t8["compile_target"], t4["compile_target"])


def test_outputs_are_named_as_compressed_tensors_names_them(registry):
    assert [(o.name, o.dtype) for o in registry.get("mxfp8").outputs] == [
        ("weight", torch.float8_e4m3fn),
        ("weight_scale", torch.uint8),
    ]
    assert [(o.name, o.dtype) for o in registry.get("mxfp4").outputs] == [
        ("weight_packed", torch.uint8),
        ("weight_scale", torch.uint8),
    ]
    assert registry.get("mxfp4").output_shapes((2, 8, 64)) == ((2, 8, 32), (2, 8, 2))
