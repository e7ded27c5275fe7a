"""The installed conversion-core-cutlass-fp8 distribution: bytes, tags, refusals, its rules.

Needs only conversion-core and this plugin installed. The conversion is taken from the
registry (entry points really discovered), never imported by path. Bytes are checked against
a row-by-row formulation written here, with an e4m3 encoder built from the format's
definition (``conversion_core.testing.e4m3_reference_bytes``), not torch's float8 cast.
"""

from __future__ import annotations

import random

import pytest
import torch

import conversion_core as cc
from conversion_core.testing import CHECKS, check_conversion, e4m3_reference_bytes

NAME = "cutlass_fp8_e4m3_per_channel"
PLUGIN = "cutlass_fp8"


@pytest.fixture(scope="module")
def registry() -> cc.Registry:
    registry = cc.load_registry(reload=True)
    assert NAME in registry.names(), f"{NAME} is not registered; is conversion-core-cutlass-fp8 installed?"
    return registry


@pytest.fixture(scope="module")
def conversion(registry: cc.Registry) -> cc.Conversion:
    return registry.get(NAME)


def reference(src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q bytes, scales) computed one output row at a time: amax over the whole row K."""
    x = src.detach().cpu().float()
    rows = x.reshape(-1, x.shape[-1])
    q = torch.empty(rows.shape, dtype=torch.uint8)
    scales = torch.empty(rows.shape[0], dtype=torch.float32)
    floor, fmax = torch.tensor(1e-12, dtype=torch.float32), torch.tensor(448.0, dtype=torch.float32)
    for r in range(rows.shape[0]):
        scale = torch.maximum(rows[r].abs().max(), floor) / fmax
        q[r] = e4m3_reference_bytes((rows[r] / scale).clamp(-448.0, 448.0))
        scales[r] = scale
    return q.reshape(src.shape), scales.reshape(src.shape[:-1])


def weights(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random weights: per-row magnitudes over 6 decades (fp16-safe), a zero row, an outlier column."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.logspace(-4, 2, shape[-2]).unsqueeze(-1)
    x[..., 0, :] = 0.0
    if shape[-1] > 1:
        x[..., -1] *= 8.0
    return x.to(dtype)


def _random_shapes(seed: int) -> list[tuple[int, ...]]:
    rng = random.Random(seed)
    shapes: list[tuple[int, ...]] = [(rng.randint(1, 300), rng.randint(1, 400)) for _ in range(3)]
    shapes += [(rng.randint(1, 3), rng.randint(1, 300), rng.randint(1, 400)) for _ in range(2)]
    return shapes


SHAPES = [(128, 128), (256, 384), (1, 1), (130, 257), (300, 400), (3, 128, 256), (2, 129, 200), *_random_shapes(5)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bytes_match_rowwise_reference(conversion: cc.Conversion, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    src = weights(shape, dtype, seed=sum(shape))
    out, scale = conversion.allocate(shape, "cpu")
    conversion.fn(src, out, scale)
    want_q, want_scale = reference(src)
    assert scale is not None and scale.shape == want_scale.shape == shape[:-1]
    assert torch.equal(scale.view(torch.int32), want_scale.view(torch.int32)), "scales differ from the reference"
    mismatch = out.view(torch.uint8) != want_q
    assert not bool(mismatch.any()), (
        f"{int(mismatch.sum())} e4m3 bytes differ, first at {mismatch.nonzero()[0].tolist()}"
    )


def test_one_scale_per_output_row(conversion: cc.Conversion) -> None:
    """Row r of expert e holds the value e*10 + r + 1 everywhere: its scale is that over 448."""
    e, n, k = 2, 3, 5
    values = torch.tensor([[ei * 10.0 + r + 1 for r in range(n)] for ei in range(e)])
    src = values.unsqueeze(-1).expand(e, n, k).to(torch.bfloat16)
    out, scale = conversion.convert(src)
    assert scale is not None and scale.shape == (e, n)
    assert scale.tolist() == (values / 448).tolist()
    assert (out.float() == 448.0).all()


def test_declared_format_matches_design(registry: cc.Registry, conversion: cc.Conversion) -> None:
    assert conversion.tags == {
        "compile_target": "cutlass_fp8",
        "compile_metadata": {
            "dtype": "e4m3",
            "scale_layout": "per_channel",
            "scale_axis": -1,
            "activation_scheme": "dynamic",
        },
    }
    assert conversion.scale_name == "weight_scale"
    assert conversion.dst_dtype == torch.float8_e4m3fn and conversion.scale_dtype == torch.float32
    assert conversion.requires_scale is True
    assert conversion.scale_shape((7, 9)) == (7,) and conversion.scale_shape((4, 7, 9)) == (4, 7)
    assert registry.provider(NAME) == PLUGIN
    (info,) = [p for p in registry.plugins() if p.name == PLUGIN]
    assert (info.dist, info.status) == ("conversion-core-cutlass-fp8", "loaded")
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
        {"quant_method": "fp8", "quant_format": "cutlass"},
        {"quant_method": "fp8", "activation_scheme": "dynamic"},
        {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic"},
    ],
    ids=["quant_format-cutlass", "no-blocks-dynamic", "no-blocks-dynamic-e4m3"],
)
def test_seed_cutlass_configs_select_this_conversion(registry: cc.Registry, qc: dict) -> None:
    assert cc.select_default_conversion({"model_type": "x", "quantization_config": qc}, registry) == NAME


@pytest.mark.parametrize(
    "qc",
    [
        {"quant_method": "fp8", "activation_scheme": "static"},
        {"quant_method": "fp8", "quant_format": "cutlass", "scale_fmt": "ue8m0"},
        {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [64, 64]},
        {"quant_method": "fp8", "quant_format": "cutlass", "fmt": "e5m2"},
    ],
    ids=["static", "ue8m0", "64x64-blocks", "e5m2"],
)
def test_configs_these_bytes_cannot_serve_are_not_claimed(registry: cc.Registry, qc: dict) -> None:
    outcomes = [o for o in cc.explain(qc, registry) if o.plugin == PLUGIN]
    assert outcomes and all(o.outcome == "no match" for o in outcomes), outcomes
