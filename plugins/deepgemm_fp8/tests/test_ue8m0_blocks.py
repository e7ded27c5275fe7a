"""``fp8_128x128_ue8m0`` (power-of-two block scales) as installed: bytes, tags, refusals, its rule.

The conversion comes from the registry (its entry point really discovered). Bytes are checked
against a block-by-block formulation written here from the format's definition, with Python
floats and ints only: the float32 quotient ``max(amax, f32(1e-4)) / 448`` by ``struct``, its
power of two by ``math.frexp``, and e4m3 bytes by ``conversion_core.testing.e4m3_reference_bytes``
(not torch's float8 cast).
"""

from __future__ import annotations

import math
import struct

import deepgemm_block_reference
import pytest
import torch

import conversion_core as cc
from conversion_core.testing import CHECKS, NON_CONTIGUOUS_VIEWS, check_conversion, non_contiguous_view

NAME = "fp8_128x128_ue8m0"
FP32_SCALES = "fp8_128x128"
PLUGIN = "deepgemm_fp8_ue8m0"
BLOCK = 128
UE8M0_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
    "scale_fmt": "ue8m0",
}


@pytest.fixture(scope="module")
def registry() -> cc.Registry:
    registry = cc.load_registry(reload=True)
    assert NAME in registry.names(), f"{NAME} is not registered; is conversion-core-deepgemm-fp8 installed?"
    return registry


@pytest.fixture(scope="module")
def conversion(registry: cc.Registry) -> cc.Conversion:
    return registry.get(NAME)


def f32(value: float) -> float:
    """``value`` rounded to the nearest float32 (exact for a quotient of float32s: 53 >= 2*24 + 2 bits)."""
    return struct.unpack("<f", struct.pack("<f", value))[0]


def f32_step(value: float, steps: int) -> float:
    """The float32 ``steps`` units in the last place away from positive float32 ``value``."""
    return struct.unpack("<f", struct.pack("<I", struct.unpack("<I", struct.pack("<f", value))[0] + steps))[0]


def ue8m0_scale(amax: float) -> float:
    """2^ceil(log2(f32(max(amax, f32(1e-4)) / 448))), the power of two from frexp, not from float bits."""
    s = f32(max(amax, f32(1e-4)) / 448.0)
    mantissa, exponent = math.frexp(s)  # s = mantissa * 2**exponent, 0.5 <= mantissa < 1
    return math.ldexp(1.0, exponent - 1 if mantissa == 0.5 else exponent)


def reference(src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q bytes, scales) block by block in float64: the UE8M0 scale of each block's amax, and |q| at most 240
    for a scale of 2^120 (256 * 2^120 is Inf in float32)."""
    return deepgemm_block_reference.reference(
        src,
        lambda block: ue8m0_scale(float(block.abs().max())),
        lambda scale: min(448.0, 15.0 * 2.0**124 / float(scale)),
        dtype=torch.float64,
    )


def weights(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """The shared block weights, with a block below the 1e-4 floor."""
    return deepgemm_block_reference.weights(shape, dtype, seed, tiny_block=True)


SHAPES = deepgemm_block_reference.shapes(15)


def _convert(conversion: cc.Conversion, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out, scale = conversion.allocate(src.shape, "cpu")
    assert scale is not None
    out.view(torch.uint8).fill_(0x7F)  # poison: e4m3 NaN wherever nothing is written
    scale.fill_(float("nan"))
    conversion.fn(src, out, scale)
    return out, scale


def _assert_matches_reference(conversion: cc.Conversion, src: torch.Tensor) -> None:
    out, scale = _convert(conversion, src)
    want_q, want_scale = reference(src)
    assert scale.shape == want_scale.shape
    assert torch.equal(scale.view(torch.int32), want_scale.view(torch.int32)), "scales differ from the reference"
    mismatch = out.view(torch.uint8) != want_q
    assert not bool(mismatch.any()), (
        f"{int(mismatch.sum())} e4m3 bytes differ, first at {mismatch.nonzero()[0].tolist()}"
    )


# --------------------------------------------------------------------------- bytes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bytes_match_blockwise_reference(conversion: cc.Conversion, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    _assert_matches_reference(conversion, weights(shape, dtype, seed=sum(shape)))


@pytest.mark.parametrize(
    "shape",
    [(2100, 1000), (130, 9000), (3, 300, 700)],
    ids=["bands-grouped", "band-split-by-columns", "experts-ragged"],
)
def test_chunked_cpu_path_matches_reference(conversion: cc.Conversion, shape: tuple[int, ...]) -> None:
    """Shapes that take several chunks of the CPU path (grouped bands, a band split by columns)."""
    _assert_matches_reference(conversion, weights(shape, torch.bfloat16, seed=7))


@pytest.mark.parametrize("view", NON_CONTIGUOUS_VIEWS)
def test_non_contiguous_sources(conversion: cc.Conversion, view: str) -> None:
    src = non_contiguous_view(view, weights)
    _assert_matches_reference(conversion, src)


def test_torch_path_equals_its_simple_reference_formulation() -> None:
    """The chunked CPU path and the one-shot vectorised formulation, both with the UE8M0 scale step."""
    from conversion_core_deepgemm_fp8 import torch_path, ue8m0

    for shape in [(2100, 1000), (130, 9000), (3, 300, 700), (1, 1)]:
        src = weights(shape, torch.bfloat16, seed=11)
        got = [torch.empty(shape, dtype=torch.float8_e4m3fn), torch.empty(ue8m0.scale_shape(shape))]
        want = [torch.empty(shape, dtype=torch.float8_e4m3fn), torch.empty(ue8m0.scale_shape(shape))]
        torch_path.quantize_blocks(src, *got, (128, 128), NAME, scale_fn=ue8m0.scale_from_amax)
        torch_path.reference_quantize_blocks(src, *want, (128, 128), NAME, scale_fn=ue8m0.scale_from_amax)
        assert torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8)), shape
        assert torch.equal(got[1].view(torch.int32), want[1].view(torch.int32)), shape


@pytest.mark.parametrize("shape", [(2100, 1000), (3, 130, 257), (4, 5)], ids=str)
def test_conversion_equals_its_vectorised_definition(conversion: cc.Conversion, shape: tuple[int, ...]) -> None:
    """``fn`` (chunked CPU path + saturation) against ``ue8m0.reference_quantize`` (one vectorised pass)."""
    from conversion_core_deepgemm_fp8 import ue8m0

    src = weights(shape, torch.float32, seed=2)
    src.view(-1)[:: max(1, src.numel() // 7)] = 3.3e38  # some blocks at the saturating scale
    out, scale = _convert(conversion, src)
    want_q, want_s = conversion.allocate(shape, "cpu")
    assert want_s is not None
    ue8m0.reference_quantize(src, want_q, want_s)
    assert torch.equal(out.view(torch.uint8), want_q.view(torch.uint8))
    assert torch.equal(scale.view(torch.int32), want_s.view(torch.int32))
    assert bool((scale == 2.0**120).any())


def test_every_scale_is_a_power_of_two(conversion: cc.Conversion) -> None:
    g = torch.Generator().manual_seed(3)
    src = torch.randn(4, 300, 500, generator=g) * torch.exp(torch.empty(4, 300, 1).uniform_(-12, 12, generator=g))
    _, scale = _convert(conversion, src)
    bits = scale.view(torch.int32)
    assert bool(((bits & 0x7FFFFF) == 0).all()), "a scale has mantissa bits"
    assert bool((bits > 0).all()), "a scale is zero, negative or NaN"
    for value in scale.flatten().tolist():
        assert math.frexp(value)[0] == 0.5, value


def test_ceil_pow2_bit_rule() -> None:
    """The integer rule against frexp on every binade's edges: exact powers stay, anything above goes up."""
    from conversion_core_deepgemm_fp8.ue8m0 import ceil_pow2

    values = []
    for e in range(-126, 127):
        p = math.ldexp(1.0, e)
        values += [p, f32(p * (1 + 2.0**-23)), f32(p * 1.5), f32(p * (2 - 2.0**-23))]
    s = torch.tensor(values, dtype=torch.float32)
    got = ceil_pow2(s.clone()).tolist()
    want = [math.ldexp(1.0, math.frexp(v)[1] - (1 if math.frexp(v)[0] == 0.5 else 0)) for v in s.tolist()]
    assert got == want


def test_all_zero_block(conversion: cc.Conversion) -> None:
    """amax 0 is floored to 1e-4: scale 2^-22 (f32(1e-4)/448 = 2.23e-7 lies in (2^-23, 2^-22]); zero bytes."""
    src = torch.zeros(130, 257, dtype=torch.bfloat16)
    src[0, 200] = -0.0
    out, scale = _convert(conversion, src)
    assert torch.equal(scale, torch.full((2, 3), 2.0**-22))
    assert set(out.view(torch.uint8).unique().tolist()) <= {0x00, 0x80}
    assert out.view(torch.uint8)[0, 200] == 0x80  # the signed zero keeps its sign
    assert bool((conversion.dequantize(out, scale) == 0).all())


def test_amax_below_the_floor_uses_the_floor_scale(conversion: cc.Conversion) -> None:
    src = torch.full((128, 128), 3.0e-7)
    src[5, 7] = -1.0e-6
    out, scale = _convert(conversion, src)
    assert scale.item() == 2.0**-22
    assert out.float()[5, 7].item() == -4.0 and out.float()[0, 0].item() == 1.25  # 1e-6 * 2^22 = 4.19 -> 4
    _assert_matches_reference(conversion, src)


@pytest.mark.parametrize("k", [-20, -7, 0, 1, 9, 60])
def test_values_at_the_448_boundary(conversion: cc.Conversion, k: int) -> None:
    """amax exactly 448 * 2^k: scale 2^k and q = 448; one float32 step above: scale 2^(k+1), q = 224;
    one step below: scale 2^k and q rounds up to 448. Also the e4m3 tie 432 (between 416 and 448)."""
    p = math.ldexp(1.0, k)
    top = 448.0 * p
    up, down = f32_step(top, +1), f32_step(top, -1)
    cases = [  # (block values, expected scale, expected q of element 0)
        ([top, 432.0 * p, -top, 17.0 * p], p, 448.0),
        ([up, -up, 1.0 * p], 2 * p, 224.0),
        ([down, -down, 432.0 * p], p, 448.0),
        ([-top * 0.5], p / 2, -448.0),
    ]
    for values, want_scale, want_q0 in cases:
        src = torch.zeros(3, 128, 128)
        src[0, 0, : len(values)] = torch.tensor(values)
        src[1] = src[0] * -1
        src[2, 127, 127] = values[0]
        out, scale = _convert(conversion, src)
        assert scale[0, 0, 0].item() == want_scale and scale[2, 0, 0].item() == want_scale, (values, scale)
        assert out.float()[0, 0, 0].item() == want_q0, (values, out.float()[0, 0, :4])
        assert out.float()[1, 0, 0].item() == -want_q0
        _assert_matches_reference(conversion, src)
    # the tie: 432 = 416 + 32 -> the even mantissa, 448
    src = torch.zeros(128, 128)
    src[0, :2] = torch.tensor([top, 432.0 * p])
    out, _ = _convert(conversion, src)
    assert out.float()[0, :2].tolist() == [448.0, 448.0]


def test_huge_values_saturate_to_a_finite_product(conversion: cc.Conversion) -> None:
    """amax near float32's max: scale 2^120, where x / scale reaches 255.99. Rounded to nearest that
    is 256, and 256 * 2^120 = 2^128 is Inf; the bytes saturate to 240 (the largest finite q * scale)."""
    src = torch.full((4, 5), 3.0e38)
    src[1, 2] = -3.4028234663852886e38
    src[0, 0] = 248.0 * 2.0**120  # rounds to 256 without the saturation
    src[0, 1] = 232.0 * 2.0**120  # an e4m3 tie between 224 and 240: the even mantissa, 224
    src[0, 2] = 2.0**-100  # tiny against the scale: a float32 subnormal quotient, then 0
    out, scale = _convert(conversion, src)
    assert scale.item() == 2.0**120  # 3.4e38 / 448 = 7.6e35 lies in (2^119, 2^120]
    q = out.float()
    assert q[1, 2].item() == -240.0 and q[0, 0].item() == 240.0 and q[0, 1].item() == 224.0 and q[0, 2].item() == 0
    assert q[0, 3].item() == 224.0  # 3e38 / 2^120 = 225.4
    assert bool(torch.isfinite(conversion.dequantize(out, scale)).all())
    _assert_matches_reference(conversion, src)
    bf16_max = torch.full((128, 128), torch.finfo(torch.bfloat16).max, dtype=torch.bfloat16)
    out, scale = _convert(conversion, bf16_max)  # 255 * 2^120: 255 -> 240 as well
    assert scale.item() == 2.0**120 and bool((out.float() == 240.0).all())
    _assert_matches_reference(conversion, bf16_max)


def test_saturation_is_a_no_op_below_the_saturating_scale() -> None:
    """qmax = min(448, 15 * 2^124 / scale) is 448 for every scale up to 2^119."""
    for e in range(-22, 120):
        assert min(448.0, 15.0 * 2.0**124 / 2.0**e) == 448.0, e
    assert min(448.0, 15.0 * 2.0**124 / 2.0**120) == 240.0


def test_blocks_never_cross_experts(conversion: cc.Conversion) -> None:
    """Rows 0..63 of expert 1 share no block with expert 0, whose values are 1000x larger."""
    src = torch.cat([torch.full((1, 64, 128), 1000.0), torch.full((1, 64, 128), 1.0)]).to(torch.bfloat16)
    _, scale = conversion.convert(src)
    assert scale is not None and scale.flatten().tolist() == [4.0, 2.0**-8]  # 1000/448 -> 4; 1/448 -> 2^-8


def test_differs_from_the_float32_scale_conversion_only_by_the_scale_step(registry: cc.Registry) -> None:
    """Same source, both conversions: scales differ (power of two vs amax/448) wherever amax/448 is not one."""
    src = weights((3, 300, 500), torch.bfloat16, seed=5)
    _, s_pow2 = registry.get(NAME).convert(src)
    _, s_fp32 = registry.get(FP32_SCALES).convert(src)
    assert s_pow2 is not None and s_fp32 is not None
    floored = s_fp32 < f32(1e-4) / 448  # amax below the 1e-4 floor: the float32 scale is smaller still
    assert bool((s_pow2 >= s_fp32).all()) and bool(((s_pow2 < 2 * s_fp32) | floored).all())
    assert bool(floored.any()) and bool((s_pow2 != s_fp32).any())


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("shape", [(130, 257), (2, 64, 300)], ids=str)
def test_non_finite_source_is_refused(conversion: cc.Conversion, shape: tuple[int, ...], bad: float) -> None:
    src = weights(shape, torch.float32, seed=1)
    src[..., -1, 5] = bad
    out, scale = conversion.allocate(shape, "cpu")
    assert scale is not None
    out.view(torch.uint8).fill_(0x5A)
    scale.view(torch.uint8).fill_(0x5A)
    with pytest.raises(cc.ConversionInputError) as info:
        conversion.fn(src.to(torch.bfloat16), out, scale)
    assert isinstance(info.value, ValueError)
    assert str(shape) in str(info.value) and "NaN or Inf" in str(info.value) and NAME in str(info.value)
    assert bool((out.view(torch.uint8) == 0x5A).all()) and bool((scale.view(torch.uint8) == 0x5A).all())


@pytest.mark.parametrize("shape", [(256,), (2, 2, 128, 128)], ids=str)
def test_1d_and_4d_sources_are_refused(conversion: cc.Conversion, shape: tuple[int, ...]) -> None:
    with pytest.raises(cc.ConversionInputError, match=r"expected 2-D or 3-D") as info:
        conversion.convert(torch.ones(shape, dtype=torch.bfloat16))
    assert str(shape) in str(info.value)


def test_dequantize_errors_name_this_conversion(conversion: cc.Conversion) -> None:
    with pytest.raises(cc.ConversionInputError, match=NAME):
        conversion.dequantize(torch.zeros(4, 4, dtype=torch.float8_e4m3fn), None)


# --------------------------------------------------------------------------- declared format, tags, kit


def test_scale_shape_follows_ceil_division(conversion: cc.Conversion) -> None:
    assert conversion.scale_shape((128, 128)) == (1, 1)
    assert conversion.scale_shape((129, 257)) == (2, 3)
    assert conversion.scale_shape((3, 7168, 2048)) == (3, 56, 16)


def test_declared_format(registry: cc.Registry, conversion: cc.Conversion) -> None:
    assert conversion.tags == {
        "compile_target": "deep_gemm_fp8_ue8m0",
        "compile_metadata": {
            "block_size": [128, 128],
            "scale_layout": "blockwise",
            "dtype": "e4m3",
            "scale_fmt": "ue8m0",
            "scale_dtype": "float32",
        },
    }
    assert conversion.scale_name == "weight_scale_inv"
    assert conversion.dst_dtype == torch.float8_e4m3fn and conversion.scale_dtype == torch.float32
    assert conversion.requires_scale is True and conversion.launch is not None
    assert registry.provider(NAME) == PLUGIN
    infos = {p.name: p for p in registry.plugins()}
    assert (infos[PLUGIN].dist, infos[PLUGIN].status) == ("conversion-core-deepgemm-fp8", "loaded")
    assert infos[PLUGIN].conversions == (NAME,)
    assert infos[PLUGIN].rules == ("fp8-block-128x128-ue8m0",)
    assert infos["deepgemm_fp8"].conversions == (FP32_SCALES,)  # the float32-scale entry point is unchanged


def test_receivers_tell_the_two_scale_formats_apart(registry: cc.Registry) -> None:
    pow2, fp32 = registry.get(NAME).tags, registry.get(FP32_SCALES).tags
    # a receiver of power-of-two scales refuses float32 scales ...
    assert cc.accepts(pow2, ["deep_gemm_fp8_ue8m0"], {"scale_fmt": "ue8m0", "block_size": [128, 128]})
    assert not cc.accepts(fp32, ["deep_gemm_fp8_ue8m0"])
    assert not cc.accepts(fp32, None, {"scale_fmt": "ue8m0"})
    # ... and a receiver of float32 scales refuses power-of-two scales
    assert cc.accepts(fp32, ["deep_gemm_fp8"], {"block_size": (128, 128), "dtype": "e4m3"})
    assert not cc.accepts(pow2, ["deep_gemm_fp8"])
    assert not cc.accepts(pow2, ["deep_gemm_fp8"], {"block_size": [128, 128], "dtype": "e4m3"})


@pytest.mark.parametrize("check", CHECKS)
def test_conformance_kit(conversion: cc.Conversion, check: str) -> None:
    check_conversion(conversion, only=[check])


# --------------------------------------------------------------------------- the rule


@pytest.mark.parametrize(
    "qc",
    [
        UE8M0_CONFIG,
        {k: v for k, v in UE8M0_CONFIG.items() if k != "fmt"},
        {"quant_method": "fp8", "weight_block_size": [128, 128], "scale_fmt": "ue8m0"},
        {**UE8M0_CONFIG, "modules_to_not_convert": ["lm_head"], "expert_dtype": "fp8"},
    ],
    ids=["deepseek-v3.1", "no-fmt", "minimal", "ignore-list"],
)
def test_ue8m0_config_selects_this_conversion(registry: cc.Registry, qc: dict) -> None:
    assert cc.select_default_conversion({"model_type": "deepseek_v3", "quantization_config": qc}, registry) == NAME
    (selected,) = [o for o in cc.explain(qc, registry) if o.selected]
    assert (selected.plugin, selected.priority, selected.rule) == (PLUGIN, 200, "fp8-block-128x128-ue8m0")
    fp32_rules = [o for o in cc.explain(qc, registry) if o.plugin == "deepgemm_fp8"]
    assert fp32_rules and all(o.outcome == "no match" for o in fp32_rules)  # they still refuse ue8m0


@pytest.mark.parametrize(
    "qc",
    [
        {**UE8M0_CONFIG, "activation_scheme": "static"},
        {**UE8M0_CONFIG, "fmt": "e5m2"},
        {**UE8M0_CONFIG, "weight_block_size": [64, 64]},
        {**UE8M0_CONFIG, "expert_dtype": "fp4"},
        {**UE8M0_CONFIG, "some_new_key": 1},
        {**UE8M0_CONFIG, "scale_fmt": "float32"},
        {k: v for k, v in UE8M0_CONFIG.items() if k != "scale_fmt"},
        {k: v for k, v in UE8M0_CONFIG.items() if k != "weight_block_size"},
        {**UE8M0_CONFIG, "quant_method": "compressed-tensors"},
        {},
    ],
    ids="static e5m2 64x64 fp4-experts unknown-key scale-fmt-float32 no-scale-fmt no-blocks ct unquantized".split(),
)
def test_configs_this_rule_must_not_claim(registry: cc.Registry, qc: dict) -> None:
    outcomes = [o for o in cc.explain(qc, registry) if o.plugin == PLUGIN]
    assert outcomes and all(o.outcome == "no match" for o in outcomes), outcomes


def test_float32_block_config_still_selects_float32_scales(registry: cc.Registry) -> None:
    qc = {k: v for k, v in UE8M0_CONFIG.items() if k != "scale_fmt"}
    assert cc.select_default_conversion(qc, registry) == FP32_SCALES
