"""The installed example plugin: conformance kit, exact bytes, tags, refusals, its rule.

This is the test file a third party copies: it takes the conversion from the registry (so the
entry point really is discovered), runs every conformance check, and compares the bytes with
a formulation written here.
"""

from __future__ import annotations

import pytest
import torch

import conversion_core as cc
from conversion_core.testing import CHECKS, check_conversion, e4m3_reference_bytes

NAME = "fp8_per_tensor"
PLUGIN = "fp8_per_tensor"


@pytest.fixture(scope="module")
def registry() -> cc.Registry:
    registry = cc.load_registry(reload=True)
    assert NAME in registry.names(), "fp8_per_tensor is not registered: pip install -e examples/third_party_plugin"
    return registry


@pytest.fixture(scope="module")
def conversion(registry: cc.Registry) -> cc.Conversion:
    return registry.get(NAME)


@pytest.mark.parametrize("check", CHECKS)
def test_conformance_kit(conversion: cc.Conversion, check: str) -> None:
    check_conversion(conversion, only=[check])


def reference(src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q bytes, scale): one amax over every element of every expert."""
    x = src.detach().cpu().float()
    scale = torch.maximum(x.abs().max(), torch.tensor(1e-12)) / torch.tensor(448.0)
    return e4m3_reference_bytes((x / scale).clamp(-448.0, 448.0)), scale.reshape(1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (128, 128), (130, 257), (300, 400), (3, 100, 129)], ids=str)
def test_bytes_match_reference(conversion: cc.Conversion, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(sum(shape))
    src = (torch.randn(shape, generator=g) * torch.logspace(-3, 1, shape[-1])).to(dtype)
    out, scale = conversion.allocate(shape, "cpu")
    conversion.fn(src, out, scale)
    want_q, want_scale = reference(src)
    assert scale is not None and scale.shape == (1,)
    assert torch.equal(scale.view(torch.int32), want_scale.view(torch.int32))
    assert torch.equal(out.view(torch.uint8), want_q)


def test_declared_format(registry: cc.Registry, conversion: cc.Conversion) -> None:
    assert conversion.tags == {
        "compile_target": "fp8_per_tensor",
        "compile_metadata": {"dtype": "e4m3", "scale_layout": "per_tensor", "scale_shape": [1]},
    }
    assert conversion.scale_name == "weight_scale" and conversion.scale_shape((3, 4, 5)) == (1,)
    assert registry.provider(NAME) == PLUGIN
    (info,) = [p for p in registry.plugins() if p.name == PLUGIN]
    assert (info.dist, info.status) == ("conversion-core-fp8-per-tensor", "loaded")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_source_is_refused(conversion: cc.Conversion, bad: float) -> None:
    src = torch.ones(3, 130, 7)
    src[2, 129, 6] = bad
    with pytest.raises(cc.ConversionInputError, match=r"\(3, 130, 7\) holds NaN or Inf"):
        conversion.convert(src)


@pytest.mark.parametrize("shape", [(256,), (2, 2, 8, 8)], ids=str)
def test_1d_and_4d_sources_are_refused(conversion: cc.Conversion, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"expected 2-D or 3-D"):
        conversion.convert(torch.ones(shape))


COMPRESSED_TENSORS_FP8_TENSOR = {
    "quant_method": "compressed-tensors",
    "format": "float-quantized",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True, "dynamic": False},
            "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True},
        }
    },
    "ignore": ["lm_head"],
}


def test_rule_claims_compressed_tensors_per_tensor_fp8(registry: cc.Registry) -> None:
    config = {"model_type": "llama", "quantization_config": COMPRESSED_TENSORS_FP8_TENSOR}
    assert cc.select_default_conversion(config, registry) == NAME


@pytest.mark.parametrize(
    "qc",
    [
        {},
        {"quant_method": "fp8", "activation_scheme": "dynamic"},
        {"quant_method": "fp8", "weight_block_size": [128, 128]},
    ],
    ids=["unquantized", "fp8-no-blocks", "fp8-128x128"],
)
def test_rule_leaves_the_builtin_configs_alone(registry: cc.Registry, qc: dict) -> None:
    outcomes = [o for o in cc.explain(qc, registry) if o.plugin == PLUGIN]
    assert outcomes and all(o.outcome == "no match" for o in outcomes), outcomes
