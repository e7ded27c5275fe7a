"""The installed conversion-core-deepgemm-fp8 distribution: bytes, tags, refusals, its rules.

Needs only conversion-core and this plugin installed. The conversion is taken from the
registry (entry points really discovered), never imported by path. Bytes are checked against
a block-by-block formulation written here, with an e4m3 encoder built from the format's
definition (``conversion_core.testing.e4m3_reference_bytes``), not torch's float8 cast.
"""

from __future__ import annotations

import deepgemm_block_reference
import pytest
import torch
from deepgemm_block_reference import weights

import conversion_core as cc
from conversion_core.testing import CHECKS, check_conversion

NAME = "fp8_128x128"
PLUGIN = "deepgemm_fp8"
BLOCK = 128


@pytest.fixture(scope="module")
def registry() -> cc.Registry:
    registry = cc.load_registry(reload=True)
    assert NAME in registry.names(), f"{NAME} is not registered; is conversion-core-deepgemm-fp8 installed?"
    return registry


@pytest.fixture(scope="module")
def conversion(registry: cc.Registry) -> cc.Conversion:
    return registry.get(NAME)


_FLOOR, _FMAX = torch.tensor(1e-12, dtype=torch.float32), torch.tensor(448.0, dtype=torch.float32)


def reference(src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q bytes, scales) block by block: scale = max(amax, 1e-12) / 448 in float32."""
    return deepgemm_block_reference.reference(src, lambda block: torch.maximum(block.abs().max(), _FLOOR) / _FMAX)


SHAPES = deepgemm_block_reference.shapes(3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bytes_match_blockwise_reference(conversion: cc.Conversion, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    src = weights(shape, dtype, seed=sum(shape))
    out, scale = conversion.allocate(shape, "cpu")
    conversion.fn(src, out, scale)
    want_q, want_scale = reference(src)
    assert scale is not None and scale.shape == want_scale.shape
    assert torch.equal(scale.view(torch.int32), want_scale.view(torch.int32)), "scales differ from the reference"
    mismatch = out.view(torch.uint8) != want_q
    assert not bool(mismatch.any()), (
        f"{int(mismatch.sum())} e4m3 bytes differ, first at {mismatch.nonzero()[0].tolist()}"
    )


def test_blocks_never_cross_experts(conversion: cc.Conversion) -> None:
    """Rows 0..63 of expert 1 share no block with expert 0, whose values are 1000x larger."""
    src = torch.cat([torch.full((1, 64, 128), 1000.0), torch.full((1, 64, 128), 1.0)]).to(torch.bfloat16)
    _, scale = conversion.convert(src)
    assert scale is not None and scale.shape == (2, 1, 1)
    assert scale.flatten().tolist() == (torch.tensor([1000.0, 1.0]) / 448).tolist()


def test_scale_shape_follows_ceil_division(conversion: cc.Conversion) -> None:
    assert conversion.scale_shape((128, 128)) == (1, 1)
    assert conversion.scale_shape((129, 257)) == (2, 3)
    assert conversion.scale_shape((3, 7168, 2048)) == (3, 56, 16)


def test_declared_format_matches_design(registry: cc.Registry, conversion: cc.Conversion) -> None:
    assert conversion.tags == {
        "compile_target": "deep_gemm_fp8",
        "compile_metadata": {"block_size": [128, 128], "scale_layout": "blockwise", "dtype": "e4m3"},
    }
    assert conversion.scale_name == "weight_scale_inv"
    assert conversion.dst_dtype == torch.float8_e4m3fn and conversion.scale_dtype == torch.float32
    assert conversion.requires_scale is True
    assert registry.provider(NAME) == PLUGIN
    (info,) = [p for p in registry.plugins() if p.name == PLUGIN]
    assert (info.dist, info.status) == ("conversion-core-deepgemm-fp8", "loaded")
    assert info.conversions == (NAME,)


@pytest.mark.parametrize("check", CHECKS)
def test_conformance_kit(conversion: cc.Conversion, check: str) -> None:
    check_conversion(conversion, only=[check])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("shape", [(130, 257), (2, 64, 300)], ids=str)
def test_non_finite_source_is_refused(conversion: cc.Conversion, shape: tuple[int, ...], bad: float) -> None:
    src = weights(shape, torch.float32, seed=1)
    src[..., -1, 5] = bad
    out, scale = conversion.allocate(shape, "cpu")
    with pytest.raises(cc.ConversionInputError) as info:
        conversion.fn(src.to(torch.bfloat16), out, scale)
    assert isinstance(info.value, ValueError)
    assert str(shape) in str(info.value) and "NaN or Inf" in str(info.value)


@pytest.mark.parametrize("shape", [(256,), (2, 2, 128, 128)], ids=str)
def test_1d_and_4d_sources_are_refused(conversion: cc.Conversion, shape: tuple[int, ...]) -> None:
    with pytest.raises(cc.ConversionInputError, match=r"expected 2-D or 3-D") as info:
        conversion.convert(torch.ones(shape, dtype=torch.bfloat16))
    assert str(shape) in str(info.value) and isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "qc",
    [
        {"quant_method": "fp8", "weight_block_size": [128, 128]},
        {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
    ],
    ids=["seed", "deepseek-v3"],
)
def test_block_128_config_selects_this_conversion(registry: cc.Registry, qc: dict) -> None:
    assert cc.select_default_conversion({"model_type": "x", "quantization_config": qc}, registry) == NAME


@pytest.mark.parametrize(
    "qc",
    [
        {"quant_method": "fp8", "weight_block_size": [64, 64]},
        {"quant_method": "fp8", "weight_block_size": [128, 128], "scale_fmt": "ue8m0"},
        {"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "static"},
        {"quant_method": "fp8", "weight_block_size": [128, 128], "fmt": "e5m2"},
    ],
    ids=["64x64", "ue8m0", "static", "e5m2"],
)
def test_configs_these_bytes_cannot_serve_are_not_claimed(registry: cc.Registry, qc: dict) -> None:
    outcomes = [o for o in cc.explain(qc, registry) if o.plugin == PLUGIN]
    assert outcomes and all(o.outcome == "no match" for o in outcomes), outcomes
