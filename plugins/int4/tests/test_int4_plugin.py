"""The installed int4 plugin: conformance kit, exact bytes against a reference from the definition,
refusals, tags, rules and the whole-model plan.

Conversions come from the registry (the entry point really is discovered).
"""

from __future__ import annotations

import pytest
import torch
from int4_reference import reference

import conversion_core as cc
from conversion_core.plan import build_plan
from conversion_core.testing import CHECKS, ErrorBound, check_conversion

SYM = "int4_w4a16_g128"
ASYM = "int4_w4a16_asym_g32"
ALL = [f"int4_w4a16{a}_g{g}" for a in ("", "_asym") for g in (32, 64, 128, 256)]
OUT_NAMES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")

# Round-trip bounds, derived from the format (see the plugin's README for the long form).
# Sources are first rounded to bf16: |bf16(x) - x| <= 2^-9 |x| (half a bf16 ulp, 8 significant
# bits), taken as relative 2^-8. Symmetric: s = bf16(amax / 7.5) is within 2^-8 of amax/7.5, so
# |x / s| <= 7.5 / (1 - 2^-8) < 7.53; v = bf16(x / s) moves by at most half a bf16 ulp there
# (2^-6 for [4, 8)); q = rne(clamp(v, -8, 7)) is within 1/2 of v, except at the clamp at +7 where
# v < 7.54 is moved by < 0.54. So |q - x/s| < 0.54 + 2^-6 < 9/16, and q * s is exact in float32:
# |dequantize - x| <= 2^-8 |x| + 9/16 s. Asymmetric: s = bf16(bf16(max - min) / 15) (two bf16
# roundings: the range maps onto at most 15 / (1 - 2^-8)^2 < 15.12 steps), zp is an integer within
# 1/2 + 2^-5 of -8 - min/s, v = bf16(bf16(x/s) + zp) within 2^-4 of x/s + zp (two half-ulps at |v| <
# 16); the clamp to [-8, 7] then cuts at most 15.12 - 15 + 1/2 + 2^-5 < 0.66 beyond the rounding;
# the worst is 0.66 + 2^-4 < 3/4 scale units. A truncating quantizer (error up to one step) fails both.
SYM_BOUND = ErrorBound(relative=2.0**-8, scale_units=9 / 16)
ASYM_BOUND = ErrorBound(relative=2.0**-8, scale_units=0.75)
KIT_SHAPES = [(16, 256), (3, 512), (2, 9, 256)]


@pytest.fixture(scope="module")
def registry() -> cc.Registry:
    registry = cc.load_registry(reload=True)
    missing = [n for n in ALL if n not in registry.names()]
    assert not missing, f"int4 conversions not registered: {missing} (pip install -e plugins/int4)"
    return registry


def bound_for(conversion: cc.Conversion, registry: cc.Registry) -> ErrorBound:
    from conversion_core_int4 import FORMATS

    fmt = FORMATS[conversion.name]
    base = SYM_BOUND if fmt.symmetric else ASYM_BOUND
    return ErrorBound(base.relative, base.scale_units, element_scale=fmt.element_scale)


@pytest.mark.parametrize("name", [SYM, ASYM, "int4_w4a16_g32", "int4_w4a16_asym_g128"])
@pytest.mark.parametrize("check", CHECKS)
def test_conformance_kit(registry: cc.Registry, name: str, check: str) -> None:
    conversion = registry.get(name)
    if check == "huge_values":
        pytest.skip("|x| = bf16 max: dequantized values overflow bf16; refused (test_huge_refused)")
    device = "cuda" if check == "device_agreement" and torch.cuda.is_available() else "cpu"
    check_conversion(
        conversion, error_bound=bound_for(conversion, registry), shapes=KIT_SHAPES, only=[check], device=device
    )


def test_kit_bound_catches_truncation(registry: cc.Registry) -> None:
    """A quantizer that truncates toward zero instead of rounding fails the derived bound."""
    conversion = registry.get(SYM)
    raw = conversion.raw_fn

    def truncating(src: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, shape: torch.Tensor) -> None:
        raw(src, packed, scale, shape)
        from conversion_core_int4 import torch_path

        x = src.to(torch.bfloat16).float().reshape(*src.shape[:-1], -1, 128)
        s = scale.float().unsqueeze(-1)
        q = torch.trunc(torch.clamp(x / s, -8, 7))
        packed.copy_(torch_path.pack_k(q.reshape(src.shape)))

    broken = conversion.replace(fn=truncating, launch=None, launch_group=None)  # the kit runs fn, not the kernels
    with pytest.raises(AssertionError):
        check_conversion(broken, error_bound=bound_for(conversion, registry), shapes=KIT_SHAPES, only=["round_trip"])


def awkward(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 0.02
    x[..., 0, :] = 0  # zero groups
    x[..., -1, 3] = 5.0  # an outlier
    if shape[-2] > 2:
        x[..., 1, :] = x[..., 1, :].abs()  # only positive
        x[..., 2, :] = 1e-40  # subnormal groups: the scale underflows to 0 -> 2^-7
    return x


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("shape", [(5, 256), (2, 11, 256), (1, 512)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_bytes_equal_reference(registry: cc.Registry, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    from conversion_core_int4 import FORMATS

    fmt = FORMATS[name]
    src = awkward(shape, hash((name, shape)) % 1000).to(dtype)
    got = registry.get(name).convert(src)
    want = reference(src, fmt.group, fmt.symmetric)
    assert len(got) == len(want)
    for out_name, tensor in zip(OUT_NAMES, got, strict=False):
        w = want[out_name]
        assert tensor.dtype == w.dtype and tensor.shape == w.shape, out_name
        a = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor
        b = w.view(torch.int16) if w.dtype == torch.bfloat16 else w
        assert torch.equal(a, b), f"{name} {shape} {dtype}: {out_name} differs"


def test_strided_sources_give_contiguous_bytes(registry: cc.Registry) -> None:
    conversion = registry.get(ASYM)
    base = awkward((256, 40), 3)
    view = base.t()  # (40, 256), strides (1, 40)
    for got, want in zip(conversion.convert(view), conversion.convert(view.contiguous()), strict=True):
        assert torch.equal(got, want)
    experts = awkward((12, 3, 64), 4).permute(1, 0, 2)  # (3, 12, 64) non-contiguous expert stack
    for got, want in zip(conversion.convert(experts), conversion.convert(experts.contiguous()), strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("name", [SYM, ASYM])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_refused_before_writing(registry: cc.Registry, name: str, bad: float) -> None:
    conversion = registry.get(name)
    src = awkward((8, 256), 5)
    src[3, 100] = bad
    buffers = conversion.allocate(src.shape)
    for b in buffers:
        b.zero_()
    with pytest.raises(cc.ConversionInputError, match=r"\(8, 256\)"):
        conversion.fn(src, *buffers)
    assert all(not b.any() for b in buffers), "a refused source wrote bytes"


def test_fp32_beyond_bf16_refused(registry: cc.Registry) -> None:
    src = torch.zeros(8, 128)
    src[0, 0] = torch.finfo(torch.float32).max
    with pytest.raises(cc.ConversionInputError, match="overflows bfloat16"):
        registry.get(SYM).convert(src)


def test_huge_refused(registry: cc.Registry) -> None:
    """Groups near bf16 max dequantize to Inf (-8 * s); refused. Just below the limit they convert, finite."""
    conversion = registry.get(SYM)
    src = torch.zeros(8, 128, dtype=torch.bfloat16)
    src[0, 0] = -torch.finfo(torch.bfloat16).max
    with pytest.raises(cc.ConversionInputError, match="overflow"):
        conversion.convert(src)
    src[0, 0] = -(2.0**126)
    back = conversion.dequantize(*conversion.convert(src))
    assert bool(torch.isfinite(back).all()) and float(back[0, 0]) < -(2.0**125)


def test_asym_range_overflow_refused(registry: cc.Registry) -> None:
    """max - min of one group past bf16 max: llm-compressor would write an Inf scale; refused here."""
    big = torch.finfo(torch.bfloat16).max
    src = torch.zeros(8, 64, dtype=torch.bfloat16)
    src[0, 0], src[0, 1] = big, -big
    with pytest.raises(cc.ConversionInputError, match="max - min overflows"):
        registry.get(ASYM).convert(src)


@pytest.mark.parametrize("shape", [(8, 200), (8, 64), (2, 4, 100)])
def test_k_not_a_multiple_of_the_group_refused(registry: cc.Registry, shape: tuple[int, ...]) -> None:
    with pytest.raises(cc.ConversionInputError, match=r"not a multiple of group_size 128"):
        registry.get(SYM).convert(torch.zeros(shape))


def test_tags_and_metadata(registry: cc.Registry) -> None:
    sym, asym = registry.get("int4_w4a16_g32"), registry.get("int4_w4a16_asym_g128")
    assert sym.tags["compile_target"] == asym.tags["compile_target"] == "compressed_tensors_pack_quantized_int4"
    assert sym.tags["compile_metadata"]["group_size"] == 32 and sym.tags["compile_metadata"]["symmetric"] is True
    assert asym.tags["compile_metadata"]["group_size"] == 128 and asym.tags["compile_metadata"]["symmetric"] is False
    assert not cc.accepts(sym.tags, None, {"group_size": 128})
    assert not cc.accepts(asym.tags, None, {"symmetric": True})
    assert [o.name for o in asym.outputs] == list(OUT_NAMES)
    assert [o.dtype for o in sym.outputs] == [torch.int32, torch.bfloat16, torch.int64]


def ct_config(**weights: object) -> dict:
    w = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128, "dynamic": False}
    w.update(weights)
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": w, "format": "pack-quantized"}},
        "ignore": ["lm_head"],
    }


@pytest.mark.parametrize(
    ("weights", "want"),
    [
        ({}, "int4_w4a16_g128"),
        ({"group_size": 32}, "int4_w4a16_g32"),
        ({"symmetric": False, "zp_dtype": "torch.int8"}, "int4_w4a16_asym_g128"),
        ({"actorder": "weight", "observer": "minmax"}, "int4_w4a16_g128"),
    ],
)
def test_rules_select(registry: cc.Registry, weights: dict, want: str) -> None:
    assert cc.select_default_conversion(ct_config(**weights)) == want


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"weights": {"num_bits": 8}}, "num_bits"),
        ({"weights": {"group_size": 48}}, "group_size"),
        ({"weights": {"actorder": "group"}}, "actorder"),
        ({"weights": {"strategy": "channel", "group_size": None}}, "strategy"),
        ({"weights": {"observer": "mse"}}, "observer"),
        ({"weights": {"dynamic": True}}, "dynamic"),
        ({"input_activations": {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}}, "input_act"),
        ({"kv_cache_scheme": {"num_bits": 8}}, "kv_cache_scheme"),
        ({"format": "int-quantized"}, "format"),
    ],
)
def test_rules_refuse_what_they_cannot_honour(registry: cc.Registry, change: dict, message: str) -> None:
    qc = ct_config()
    group = qc["config_groups"]["group_0"]
    for key, value in change.items():
        if key == "weights":
            group["weights"].update(value)
        elif key == "input_activations":
            group[key] = value
        else:
            qc[key] = value
    rows = [r for r in cc.explain(qc) if r.plugin == "int4"]
    assert rows and all(r.outcome in ("raised", "no match") for r in rows)
    raised = [r for r in rows if r.outcome == "raised"]
    assert raised and message in str(raised[0].error)
    assert "\n" not in str(raised[0].error)
    with pytest.raises(cc.ConversionCoreError):
        cc.select_default_conversion(qc)


def test_rules_ignore_other_formats(registry: cc.Registry) -> None:
    fp8 = {"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}
    rows = [r for r in cc.explain(fp8) if r.plugin == "int4"]
    assert rows and all(r.outcome == "no match" for r in rows)


def test_plan_names_outputs_and_refuses_partial_groups(registry: cc.Registry) -> None:
    state = {
        "model.layers.0.self_attn.q_proj.weight": awkward((64, 256), 1).bfloat16(),
        "model.layers.0.mlp.experts.gate_up_proj": awkward((2, 16, 128), 2).bfloat16(),
        "model.norm.weight": torch.ones(256, dtype=torch.bfloat16),
    }
    plan = build_plan(state, ct_config())
    outputs = plan.allocate("cpu")
    plan.run(state)
    conversion = registry.get(SYM)
    for source, stem in (
        ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.weight"),
        ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.gate_up_proj"),
    ):
        want = conversion.convert(state[source])
        suffixes = ("_packed", "_scale", "_shape")
        for suffix, w in zip(suffixes, want, strict=True):
            assert torch.equal(outputs[stem + suffix], w), stem + suffix
    assert torch.equal(outputs["model.norm.weight"], state["model.norm.weight"])
    bad = {"model.layers.0.mlp.down_proj.weight": torch.zeros(8, 200, dtype=torch.bfloat16)}
    plan = build_plan(bad, ct_config())
    plan.allocate("cpu")
    with pytest.raises(cc.ConversionCoreError, match="down_proj.*not a multiple of group_size"):
        plan.run(bad)
