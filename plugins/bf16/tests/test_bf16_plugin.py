"""The installed conversion-core-bf16 distribution: bf16_cast / fp32_cast bytes, tags, its rule.

Needs only conversion-core and this plugin installed. The conversions are taken from the
registry (entry points really discovered). bf16 bytes are checked against round-to-nearest-even
done on the float32 bit pattern with integer arithmetic, not torch's cast.
"""

from __future__ import annotations

import pytest
import torch

import conversion_core as cc
from conversion_core.testing import CHECKS, check_conversion

PLUGIN = "bf16"
NAMES = ("bf16_cast", "fp32_cast")


@pytest.fixture(scope="module")
def registry() -> cc.Registry:
    registry = cc.load_registry(reload=True)
    missing = [n for n in NAMES if n not in registry.names()]
    assert not missing, f"{missing} not registered; is conversion-core-bf16 installed?"
    return registry


def bf16_bits_rne(x: torch.Tensor) -> torch.Tensor:
    """bfloat16 bit patterns (int64) of finite float32 values, rounding to nearest even."""
    bits = x.float().contiguous().view(torch.int32).long() & 0xFFFFFFFF
    lsb = (bits >> 16) & 1
    return ((bits + 0x7FFF + lsb) >> 16) & 0xFFFF


def sources(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-20, 12, shape, generator=g).float())
    if dtype == torch.float16:
        x = x.clamp(-60000, 60000)
    x.view(-1)[::7] = 0.0
    return x.to(dtype)


SHAPES = [(5,), (128, 128), (130, 257), (3, 64, 200), (2, 3, 4, 5)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bf16_cast_rounds_to_nearest_even(registry: cc.Registry, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    conversion = registry.get("bf16_cast")
    src = sources(shape, dtype, seed=len(shape))
    out, scale = conversion.allocate(shape, "cpu")
    assert scale is None
    conversion.fn(src, out, None)
    want = bf16_bits_rne(src)
    got = out.view(torch.int16).long() & 0xFFFF
    assert torch.equal(got, want), f"{int((got != want).sum())} bf16 values differ"


def test_bf16_cast_ties_go_to_even(registry: cc.Registry) -> None:
    """1 + 2^-8 lies halfway between bf16 neighbours 1 and 1 + 2^-7: it rounds to 1 (even)."""
    src = torch.tensor([1 + 2.0**-8, 1 + 3 * 2.0**-8, -(1 + 2.0**-8)], dtype=torch.float32)
    out, _ = registry.get("bf16_cast").convert(src)
    assert out.float().tolist() == [1.0, 1 + 2 * 2.0**-7, -1.0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fp32_cast_is_exact(registry: cc.Registry, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    src = sources(shape, dtype, seed=len(shape))
    out, scale = registry.get("fp32_cast").convert(src)
    assert scale is None and out.dtype == torch.float32
    if dtype == torch.bfloat16:  # a bf16 value is the top half of its float32
        want = (src.view(torch.int16).long() & 0xFFFF) << 16
        assert torch.equal(out.view(torch.int32).long() & 0xFFFFFFFF, want)
    assert torch.equal(out.double(), src.double())


def test_declared_formats_match_design(registry: cc.Registry) -> None:
    for name, dtype in (("bf16_cast", torch.bfloat16), ("fp32_cast", torch.float32)):
        conversion = registry.get(name)
        assert conversion.tags == {"compile_target": "hf_raw", "compile_metadata": {}}
        assert conversion.dst_dtype == dtype
        assert conversion.requires_scale is False and conversion.scale_name is None
        assert registry.provider(name) == PLUGIN
    (info,) = [p for p in registry.plugins() if p.name == PLUGIN]
    assert (info.dist, info.status) == ("conversion-core-bf16", "loaded")
    assert set(info.conversions) == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("check", CHECKS)
def test_conformance_kit(registry: cc.Registry, name: str, check: str) -> None:
    check_conversion(registry.get(name), only=[check])


@pytest.mark.parametrize(
    "config",
    [{}, {"model_type": "llama"}, {"model_type": "llama", "quantization_config": None}],
    ids=["empty-quantization_config", "config-without-quantization", "quantization_config-null"],
)
def test_unquantized_model_selects_bf16_cast(registry: cc.Registry, config: dict) -> None:
    assert cc.select_default_conversion(config, registry) == "bf16_cast"


def test_quantized_model_is_not_claimed(registry: cc.Registry) -> None:
    outcomes = [o for o in cc.explain({"quant_method": "fp8"}, registry) if o.plugin == PLUGIN]
    assert outcomes and all(o.outcome == "no match" for o in outcomes), outcomes


NON_FINITE = "holds NaN or Inf"
BAD = [("nan", float("nan"), NON_FINITE), ("inf", float("inf"), NON_FINITE), ("-inf", float("-inf"), NON_FINITE)]
BAD += [("fp32 max", 3.4e38, "holds finite values beyond torch.bfloat16's range")]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("label", "bad", "why"), BAD, ids=[b[0] for b in BAD])
def test_a_cast_never_writes_nan_or_inf(registry: cc.Registry, name: str, label: str, bad: float, why: str) -> None:
    """NaN/Inf in the source, or a finite float32 that the cast to bf16 turns into Inf, is refused
    by fn, convert and convert_many alike (fp32_cast keeps 3.4e38: it fits)."""
    conversion = registry.get(name)
    src = sources((4, 70), torch.float32, seed=3)
    src[2, 33] = bad
    if name == "fp32_cast" and bad == 3.4e38:
        assert torch.equal(conversion.convert(src)[0], src)
        return
    if name == "fp32_cast":
        why = NON_FINITE
    with pytest.raises(cc.ConversionInputError, match=rf"source of shape \(4, 70\) {why}"):
        conversion.convert(src)
    with pytest.raises(cc.ConversionInputError, match=rf"convert_many item 1: .*{why}"):
        clean = src[:1].clone()
        conversion.convert_many([(clean, *conversion.allocate(clean.shape)), (src, *conversion.allocate(src.shape))])


@pytest.mark.parametrize("launched", [False, True], ids=["checked step", "launched step"])
def test_a_plan_names_the_cast_tensor_that_overflows_bf16(
    registry: cc.Registry, launched: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both steps check a cast's output: the launched one (sync-free, one flag; patched to run on
    CPU) as well as the checked one."""
    from conversion_core.plan import build_plan
    from conversion_core.plan import local as plan_local

    monkeypatch.setattr(plan_local, "use_triton", lambda t: launched)
    sd = {"model.norm.weight": torch.ones(8), "lm_head.weight": torch.randn(6, 8)}
    plan = build_plan(sd, conversion="bf16_cast", registry=registry)
    plan.allocate("cpu")
    assert plan._launchable() == launched
    plan.run(sd)
    sd["lm_head.weight"][1, 2] = 3.4e38
    with pytest.raises(cc.ConversionInputError, match=r"tensor 'lm_head.weight': .*beyond torch.bfloat16's range"):
        plan.run(sd)
    assert not plan.ready
