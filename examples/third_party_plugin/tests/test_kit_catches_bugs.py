"""The conformance kit has teeth: each check fails on a conversion with the bug it targets.

Every mutant is the example conversion with one thing broken (``Conversion.replace``); the
unbroken conversion passes every check (test_fp8_per_tensor_plugin.py).
"""

from __future__ import annotations

from collections.abc import Callable
from types import MappingProxyType

import pytest
import torch

import conversion_core as cc
from conversion_core.formats.fp8 import E4M3, non_finite_error, quantize_into, scale_from_amax
from conversion_core.testing import check_conversion, e4m3_magnitudes, e4m3_reference_bytes


@pytest.fixture(scope="module")
def good() -> cc.Conversion:
    return cc.load_registry(reload=True).get("fp8_per_tensor")


def _quantize(x: torch.Tensor, out: torch.Tensor, scale_out: torch.Tensor, divisor: float = 448.0) -> None:
    amax = x.abs().amax().reshape(1)
    if not bool(torch.isfinite(amax).all()):
        raise non_finite_error("mutant", x.shape)
    scale = amax.clamp_min(1e-12) / divisor
    quantize_into(x, scale, out)
    scale_out.copy_(scale)


def skips_last_element(src, out, scale_out):
    tmp = torch.empty_like(out)
    _quantize(src.float(), tmp, scale_out)
    out.view(-1)[:-1] = tmp.view(-1)[:-1]


def forgets_the_scale(src, out, scale_out):
    _quantize(src.float(), out, torch.empty_like(scale_out))


def ignores_strides(src, out, scale_out):
    dense = torch.as_strided(src, src.shape, torch.empty(src.shape).stride(), src.storage_offset())
    _quantize(dense.float(), out, scale_out)


def reads_fp16_bits_as_bf16(src, out, scale_out):
    x = src.view(torch.bfloat16).float() if src.dtype == torch.float16 else src.float()
    _quantize(x, out, scale_out)


def writes_nan_for_nan(src, out, scale_out):
    x = src.float()
    scale = scale_from_amax(x.abs().amax().nan_to_num(0.0, 0.0, 0.0).reshape(1))
    quantize_into(x, scale, out)
    scale_out.copy_(scale)


def refuses_without_naming_the_shape(src, out, scale_out):
    if not bool(torch.isfinite(src).all()):
        raise cc.ConversionInputError("source holds NaN or Inf")
    _quantize(src.float(), out, scale_out)


def refuses_with_a_plain_error(src, out, scale_out):
    if not bool(torch.isfinite(src).all()):
        raise RuntimeError(f"source {tuple(src.shape)} holds NaN or Inf")
    _quantize(src.float(), out, scale_out)


def divides_by_zero_for_zeros(src, out, scale_out):
    x = src.float()
    scale = (x.abs().amax() / 448.0).reshape(1)
    out.copy_((x / scale).clamp(-448, 448))
    scale_out.copy_(scale)


def overflows_the_range(src, out, scale_out):
    _quantize(src.float(), out, scale_out, divisor=896.0)  # values above amax/2 saturate at 448


def shrinks_by_ten_percent(src, out, scale_out):
    _quantize(src.float() * 0.9, out, scale_out)


def does_not_clamp(src, out, scale_out):
    x = src.float()
    scale = scale_from_amax(x.abs().amax().reshape(1)) * (448.0 / 500.0)  # q reaches 500: eager cast gives NaN
    out.copy_(x / scale)
    scale_out.copy_(scale)


def changes_its_source(src, out, scale_out):
    _quantize(src.float(), out, scale_out)
    src.view(-1)[0] = 1.0 if float(src.view(-1)[0]) != 1.0 else 2.0


FN_MUTANTS: list[tuple[Callable, str]] = [
    (skips_last_element, "writes_every_element"),
    (forgets_the_scale, "writes_every_element"),
    (ignores_strides, "non_contiguous"),
    (reads_fp16_bits_as_bf16, "source_dtypes"),
    (writes_nan_for_nan, "nonfinite_refused"),
    (refuses_without_naming_the_shape, "nonfinite_refused"),
    (refuses_with_a_plain_error, "nonfinite_refused"),
    (divides_by_zero_for_zeros, "zeros"),
    (overflows_the_range, "round_trip"),
    (shrinks_by_ten_percent, "round_trip"),
    (does_not_clamp, "huge_values"),
    (changes_its_source, "agreement"),
]


@pytest.mark.parametrize(("fn", "check"), FN_MUTANTS, ids=[f.__name__ for f, _ in FN_MUTANTS])
def test_check_fails_on_broken_fn(good: cc.Conversion, fn: Callable, check: str) -> None:
    mutant = good.replace(fn=fn)
    with pytest.raises(AssertionError, match=rf"^fp8_per_tensor: {check}"):
        check_conversion(mutant, only=[check])


def test_dequantize_without_scale_fails_round_trip(good: cc.Conversion) -> None:
    mutant = good.replace(dequantize=lambda q, scale: q.float())
    with pytest.raises(AssertionError, match="round_trip.*outside the error bound"):
        check_conversion(mutant, only=["round_trip"])


def test_non_json_metadata_fails_tags(good: cc.Conversion) -> None:
    """The core refuses such metadata when a Conversion is built; the kit catches it regardless."""
    mutant = good.replace()
    object.__setattr__(mutant, "compile_metadata", MappingProxyType({"dtype": E4M3}))
    with pytest.raises(AssertionError, match="tags.*not JSON-serialisable"):
        check_conversion(mutant, only=["tags"])


def test_unknown_check_names_are_refused(good: cc.Conversion) -> None:
    with pytest.raises(ValueError, match="unknown conformance checks"):
        check_conversion(good, only=["round_trip", "no_such_check"])


def test_unknown_output_dtype_needs_an_explicit_bound(good: cc.Conversion) -> None:
    packed = good.replace(dst_dtype=torch.uint8)
    with pytest.raises(ValueError, match="no default error bound"):
        check_conversion(packed, only=["fields"])


# The e4m3 reference encoder the byte tests rely on, checked against the format's definition.


def test_e4m3_table_is_the_format() -> None:
    table = e4m3_magnitudes()
    assert len(table) == 127 and table[-1] == 448.0 and table[1] == 2.0**-9 and table[8] == 2.0**-6
    assert bool((table[1:] > table[:-1]).all())
    assert torch.equal(e4m3_reference_bytes(table.float()), torch.arange(127, dtype=torch.uint8))


@pytest.mark.parametrize(
    ("value", "byte"),
    [
        (0.0, 0x00),
        (-0.0, 0x80),
        (1.0, 0x38),
        (448.0, 0x7E),
        (-448.0, 0xFE),
        (240.0, 0x77),
        (2.0**-10, 0x00),  # halfway between 0 and the smallest subnormal: to even (0)
        (3 * 2.0**-10, 0x02),  # halfway between 0x01 and 0x02: to even
        (1.0625, 0x38),  # halfway between 1.0 and 1.125: to even (1.0)
        (1.1875, 0x3A),  # halfway between 1.125 and 1.25: to even (1.25)
        (-1.1875, 0xBA),
        (432.0, 0x7E),  # halfway between 416 and 448: 448 has the even mantissa
    ],
)
def test_e4m3_reference_rounds_to_nearest_even(value: float, byte: int) -> None:
    assert int(e4m3_reference_bytes(torch.tensor([value]))[0]) == byte


def test_e4m3_reference_agrees_with_torch_cast_on_random_values() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1 << 18, generator=g) * torch.exp2(torch.randint(-14, 10, (1 << 18,), generator=g).float())
    x = x.clamp(-448.0, 448.0)
    assert torch.equal(e4m3_reference_bytes(x), x.to(torch.float8_e4m3fn).view(torch.uint8))


def test_e4m3_reference_refuses_out_of_range_values() -> None:
    with pytest.raises(ValueError, match="clamp first"):
        e4m3_reference_bytes(torch.tensor([449.0]))
