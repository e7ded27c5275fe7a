"""The installed toy_two_scales plugin: conformance kit, exact bytes, tags, rule, whole-model plan.

The conversion is taken from the registry (so the entry point really is discovered); the bytes
are compared with a reference written here element by element in Python floats.
"""

from __future__ import annotations

import math
import struct

import pytest
import torch

import conversion_core as cc
from conversion_core.plan import build_plan
from conversion_core.testing import CHECKS, ErrorBound, check_conversion

NAME = "toy_two_scales"
PLUGIN = "toy_two_scales"
DIST = "conversion-core-toy-two-scales"

# The round-trip bound, derived from the format. Per row, s = fl(max(amax, 1e-12) / 127) and
# v = fl(x / s), so |v - x/s| <= 2^-24 |x/s| <= 2^-24 * 127 (1 + 2^-23) < 2^-17 (|x| <= amax and
# s >= amax/127 (1 - 2^-24)). q = rne(v), clamped to +-127: |q - v| <= 1/2, and the clamp never
# moves q further (v <= 127 + 2^-17 rounds to 127 anyway). So |q s - x| <= s (1/2 + 2^-17).
# dequantize is fl(q * s') with s' = m * 2^e == s exactly (frexp split), one float32 rounding:
# |fl(q s) - q s| <= 2^-24 |q s| <= 2^-24 (|x| + s). Together:
#     |dequantize - x| <= 2^-24 |x| + (1/2 + 2^-17 + 2^-24) s.
# The kit's element scale is dequantize(ones, m, e) == s (dequantize is q * broadcast(s)), so:
# relative 2^-24 rounded up to 2^-20 (the kit's float32 slack), scale_units 1/2 + 2^-16. A
# quantizer that truncates instead of rounding (error up to s), forgets the scale or drops the
# shift exceeds it.
TOY_BOUND = ErrorBound(relative=2.0**-20, scale_units=0.5 + 2.0**-16)


@pytest.fixture(scope="module")
def registry() -> cc.Registry:
    registry = cc.load_registry(reload=True)
    assert NAME in registry.names(), "toy_two_scales is not registered: pip install -e examples/toy_two_scales"
    return registry


@pytest.fixture(scope="module")
def conversion(registry: cc.Registry) -> cc.Conversion:
    return registry.get(NAME)


@pytest.mark.parametrize("check", CHECKS)
def test_conformance_kit(conversion: cc.Conversion, check: str) -> None:
    # device_agreement is skipped on the CPU by the kit itself; run it where there is CUDA.
    device = "cuda" if check == "device_agreement" and torch.cuda.is_available() else "cpu"
    ran = check_conversion(conversion, error_bound=TOY_BOUND, only=[check], device=device)
    assert ran == ([check] if check != "device_agreement" or device != "cpu" else [])


def test_kit_bound_is_tight(conversion: cc.Conversion) -> None:
    """A quantizer that truncates (round toward zero) instead of rounding fails the derived bound."""

    def truncating(src: torch.Tensor, q: torch.Tensor, m: torch.Tensor, e: torch.Tensor) -> None:
        conversion.raw_fn(src, q, m, e)
        x = src.float()
        s = (m.double() * torch.exp2(e.double())).float().unsqueeze(-1)
        q.copy_(torch.trunc(x / s).clamp_(-127, 127))

    with pytest.raises(AssertionError, match="error bound"):
        check_conversion(conversion.replace(fn=truncating), error_bound=TOY_BOUND, only=["round_trip"])


# --------------------------------------------------------------------------- the reference


def f32(v: float) -> float:
    """Round a Python float to float32 (to nearest even)."""
    return struct.unpack("<f", struct.pack("<f", v))[0]


FLOOR = f32(1e-12)


def reference(src: torch.Tensor) -> tuple[list[int], list[float], list[int]]:
    """(q, m, e) flat in row-major order, one row (last dim) at a time, from the format's definition.

    Every float32 operation is done in float64 and rounded to float32, which equals the float32
    operation (division and products of float32 values are correctly rounded through float64).
    """
    x = src.detach().float().cpu()
    k = x.shape[-1]
    values = [float(v) for v in x.reshape(-1).tolist()]
    qs: list[int] = []
    ms: list[float] = []
    es: list[int] = []
    for start in range(0, len(values), k):
        row = values[start : start + k]
        amax = 0.0
        for v in row:
            amax = max(amax, abs(v))
        s = f32(max(amax, FLOOR) / 127.0)
        m, e = math.frexp(s)
        assert f32(m) == m and 0.5 <= m < 1
        ms.append(m)
        es.append(e)
        for v in row:
            q = round(f32(v / s))  # Python's round: half to even
            qs.append(max(-127, min(127, q)))
    return qs, ms, es


def special_source(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Random rows plus rows that hit the edges: zero, ties, the dtype's max, tiny values."""
    g = torch.Generator().manual_seed(sum(shape) + len(shape))
    x = torch.randn(shape, generator=g) * torch.logspace(-3, 2, shape[-1])
    rows = x.reshape(-1, shape[-1])
    k = shape[-1]
    if rows.shape[0] >= 4 and k >= 5:
        rows[0] = 0.0
        rows[1, :5] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5])  # s == 1: exact ties, to even
        rows[1, 5:] = 0.25
        rows[2] = torch.finfo(dtype).max if dtype != torch.float32 else torch.finfo(torch.bfloat16).max
        rows[2, ::2] *= -1
        rows[3] = 2.0**-14 * torch.arange(k).float()
    return x.to(dtype)


SHAPES = [(1, 1), (4, 5), (16, 32), (33, 130), (2, 7, 129)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bytes_match_reference(conversion: cc.Conversion, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    src = special_source(shape, dtype)
    q, m, e = conversion.allocate(shape, "cpu")
    conversion.fn(src, q, m, e)
    want_q, want_m, want_e = reference(src)
    assert (q.dtype, m.dtype, e.dtype) == (torch.int8, torch.float32, torch.int8)
    assert tuple(q.shape) == shape and tuple(m.shape) == tuple(e.shape) == shape[:-1]
    assert q.reshape(-1).tolist() == want_q
    assert torch.equal(m.reshape(-1).view(torch.int32), torch.tensor(want_m, dtype=torch.float32).view(torch.int32))
    assert e.reshape(-1).tolist() == want_e
    # dequantize is exactly q * s, s == m * 2**e
    s = [math.ldexp(mi, ei) for mi, ei in zip(want_m, want_e, strict=True)]
    k = shape[-1]
    want_back = [f32(qi * s[i // k]) for i, qi in enumerate(want_q)]
    back = conversion.dequantize(q, m, e)
    assert back.dtype == torch.float32 and tuple(back.shape) == shape
    assert back.reshape(-1).tolist() == want_back


def test_ties_round_to_even(conversion: cc.Conversion) -> None:
    src = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 3.5]])
    q, m, e = conversion.convert(src)
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, 4]]
    assert (m.item(), e.item()) == (0.5, 1)  # s == 1.0


def test_declared_format(registry: cc.Registry, conversion: cc.Conversion) -> None:
    assert conversion.tags == {
        "compile_target": "toy_two_scales_int8",
        "compile_metadata": {
            "dtype": "int8",
            "qmax": 127,
            "scale_layout": "per_row",
            "scale_encoding": "frexp_mantissa_exponent",
            "rounding": "half_to_even",
        },
    }
    assert [(o.name, o.dtype, o.placement) for o in conversion.outputs] == [
        ("weight_q", torch.int8, "elementwise"),
        ("weight_scale", torch.float32, "per_block"),
        ("weight_shift", torch.int8, "per_block"),
    ]
    assert conversion.output_shapes((3, 4, 5)) == ((3, 4, 5), (3, 4), (3, 4))
    assert conversion.declares_outputs and conversion.requires_scale and conversion.quantizes
    assert conversion.launch is not None  # torch-only, sync-free: the plan's launched (CUDA-graph) step
    assert conversion.sharded is not None
    assert registry.provider(NAME) == PLUGIN
    (info,) = [p for p in registry.plugins() if p.name == PLUGIN]
    assert (info.dist, info.status, info.conversions, info.rules) == (DIST, "loaded", (NAME,), ("toy-two-scales",))


def test_hf_raw_is_refused_for_these_outputs(conversion: cc.Conversion) -> None:
    with pytest.raises(cc.ConversionTypeError, match="hf_raw"):
        conversion.replace(compile_target="hf_raw")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_source_is_refused(conversion: cc.Conversion, bad: float) -> None:
    src = torch.ones(3, 130, 7)
    src[2, 129, 6] = bad
    buffers = conversion.allocate(src.shape)
    for b in buffers:
        b.reshape(-1).view(torch.uint8).fill_(0x5A)
    with pytest.raises(cc.ConversionInputError, match=r"\(3, 130, 7\) holds NaN or Inf"):
        conversion.fn(src, *buffers)
    assert all(bool((b.reshape(-1).view(torch.uint8) == 0x5A).all()) for b in buffers), "bytes written before refusing"


@pytest.mark.parametrize("shape", [(256,), (2, 2, 8, 8)], ids=str)
def test_1d_and_4d_sources_are_refused(conversion: cc.Conversion, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"expected 2-D or 3-D"):
        conversion.convert(torch.ones(shape))


def test_dequantize_refuses_wrong_companions(conversion: cc.Conversion) -> None:
    q, m, e = conversion.convert(torch.randn(4, 8))
    with pytest.raises(cc.ConversionInputError, match="companions of shape"):
        conversion.dequantize(q, m[:2], e)
    with pytest.raises(cc.ConversionInputError, match="int8 weight_shift"):
        conversion.dequantize(q, m, e.int())


# --------------------------------------------------------------------------- rule and config


TOY_QC = {"quant_method": "toy_two_scales", "ignore": ["lm_head"]}


@pytest.mark.parametrize(
    "config",
    [TOY_QC, {"quant_method": "toy_two_scales"}, {"model_type": "llama", "quantization_config": TOY_QC}],
    ids=["qc", "qc-bare", "config"],
)
def test_rule_claims_its_config(registry: cc.Registry, config: dict) -> None:
    assert cc.select_default_conversion(config, registry) == NAME
    (outcome,) = [o for o in cc.explain(config, registry) if o.plugin == PLUGIN]
    assert outcome.outcome == "matched"


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


def test_target_format_round_trips(conversion: cc.Conversion, registry: cc.Registry) -> None:
    target = conversion.target_format(TOY_QC)
    written = target.quantization_config(["model.embed_tokens", "lm_head"])
    assert written == {"quant_method": "toy_two_scales", "ignore": ["lm_head", "model.embed_tokens"]}
    assert cc.select_default_conversion(written, registry) == NAME
    assert target.keep("lm_head.weight") == "ignored by quantization_config: lm_head"
    assert target.keep("model.layers.0.mlp.gate_proj.weight") is None
    assert target.stored_shape(0, (4, 5)) == (4, 5) and target.stored_shape(2, (3, 4)) == (3, 4, 1)
    with pytest.raises(cc.ConfigError, match="ignore"):
        conversion.target_format({"quant_method": "toy_two_scales", "ignore": "lm_head"})


# --------------------------------------------------------------------------- whole-model plan


def llama_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A one-layer llama-like state dict (bf16), every shape off any nice multiple."""
    g = torch.Generator().manual_seed(seed)
    h, i, v, kv = 40, 72, 50, 16
    names = {
        "model.embed_tokens.weight": (v, h),
        "model.layers.0.input_layernorm.weight": (h,),
        "model.layers.0.self_attn.q_proj.weight": (h, h),
        "model.layers.0.self_attn.k_proj.weight": (kv, h),
        "model.layers.0.self_attn.v_proj.weight": (kv, h),
        "model.layers.0.self_attn.o_proj.weight": (h, h),
        "model.layers.0.post_attention_layernorm.weight": (h,),
        "model.layers.0.mlp.gate_proj.weight": (i, h),
        "model.layers.0.mlp.up_proj.weight": (i, h),
        "model.layers.0.mlp.down_proj.weight": (h, i),
        "model.norm.weight": (h,),
        "lm_head.weight": (v, h),
    }
    return {n: (torch.randn(s, generator=g) * 0.1).bfloat16() for n, s in names.items()}


QUANTIZED = [
    f"model.layers.0.{m}.weight"
    for m in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def expected_outputs(conversion: cc.Conversion, state: dict[str, torch.Tensor], quantized: list[str]) -> dict:
    """What a plan must publish: converted tensors under <module>.weight_q/_scale/_shift, the rest as is."""
    want: dict[str, torch.Tensor] = {}
    for name, src in state.items():
        if name in quantized:
            q, m, e = conversion.convert(src)
            module = name.removesuffix(".weight")
            want[module + ".weight_q"] = q
            want[module + ".weight_scale"] = m.unsqueeze(-1)
            want[module + ".weight_shift"] = e.unsqueeze(-1)
        else:
            want[name] = src
    return want


@pytest.mark.parametrize("how", ["named", "config"])
def test_plan_names_shapes_and_bytes(conversion: cc.Conversion, registry: cc.Registry, how: str) -> None:
    state = llama_state()
    if how == "named":
        plan = build_plan(state, conversion=NAME, registry=registry)
    else:
        plan = build_plan(state, {"model_type": "llama", "quantization_config": TOY_QC}, registry=registry)
    assert plan.conversion.name == NAME
    assert sorted(e.name for e in plan.quantized) == sorted(QUANTIZED)
    assert {e.name: e.kept for e in plan.kept} == {
        "model.embed_tokens.weight": "embedding",
        "model.layers.0.input_layernorm.weight": "1-D tensor",
        "model.layers.0.post_attention_layernorm.weight": "1-D tensor",
        "model.norm.weight": "1-D tensor",
        "lm_head.weight": "lm_head",
    }
    want = expected_outputs(conversion, state, QUANTIZED)
    outputs = plan.allocate("cpu")
    assert {n: (t.dtype, tuple(t.shape)) for n, t in outputs.items()} == {
        n: (t.dtype, tuple(t.shape)) for n, t in want.items()
    }
    arena = plan.arena
    assert arena is not None
    ptrs = {n: t.data_ptr() for n, t in outputs.items()}
    for step in range(2):  # the second run refills the same buffers
        state = llama_state(seed=step)
        got = plan.run(state)
        assert plan.ready and plan.arena is arena
        assert {n: t.data_ptr() for n, t in got.items()} == ptrs
        want = expected_outputs(conversion, state, QUANTIZED)
        for n, t in want.items():
            assert torch.equal(_bits(got[n]), _bits(t)), (step, n)
        for name in QUANTIZED:
            assert torch.equal(plan.dequantize(name), conversion.dequantize(*conversion.convert(state[name])))
    manifest = plan.manifest()
    assert manifest["conversion"] == NAME and manifest["tags"] == conversion.tags
    (entry,) = [t for t in manifest["tensors"] if t["name"] == "model.layers.0.mlp.down_proj.weight"]
    assert entry["outputs"] == [
        {"name": "model.layers.0.mlp.down_proj.weight_q", "shape": [40, 72], "dtype": "int8"},
        {"name": "model.layers.0.mlp.down_proj.weight_scale", "shape": [40, 1], "dtype": "float32"},
        {"name": "model.layers.0.mlp.down_proj.weight_shift", "shape": [40, 1], "dtype": "int8"},
    ]


def test_plan_keeps_what_the_config_ignores(registry: cc.Registry) -> None:
    qc = {"quant_method": "toy_two_scales", "ignore": ["model.layers.0.mlp.down_proj"]}
    plan = build_plan(llama_state(), qc, registry=registry)
    assert plan["model.layers.0.mlp.down_proj.weight"].kept == (
        "ignored by quantization_config: model.layers.0.mlp.down_proj"
    )
    assert "model.layers.0.mlp.down_proj" in plan.kept_modules()
    assert plan["model.layers.0.mlp.up_proj.weight"].kept is None


@pytest.mark.parametrize(
    "name", ["model.norm.weight", "model.layers.0.input_layernorm.weight", "model.layers.0.mlp.up_proj.weight"]
)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_plan_refuses_non_finite_naming_the_tensor(registry: cc.Registry, name: str, bad: float) -> None:
    state = llama_state()
    plan = build_plan(state, conversion=NAME, registry=registry)
    plan.allocate("cpu")
    plan.run(state)
    state[name] = state[name].clone()
    state[name].view(-1)[3] = bad
    with pytest.raises(cc.ConversionInputError, match=rf"{name.replace('.', '[.]')}.*NaN or Inf"):
        plan.run(state)
    assert not plan.ready


def test_plan_fused_experts(conversion: cc.Conversion, registry: cc.Registry) -> None:
    """Stacked experts (E, 2I, H) gate+up: rows are independent, so one call writes every shard's bytes."""
    g = torch.Generator().manual_seed(5)
    state = {
        "model.layers.0.mlp.experts.gate_up_proj": torch.randn(3, 20, 24, generator=g).bfloat16(),
        "model.layers.0.mlp.experts.down_proj": torch.randn(3, 24, 10, generator=g).bfloat16(),
        "model.layers.0.mlp.gate.weight": torch.randn(3, 24, generator=g).bfloat16(),
    }
    plan = build_plan(state, conversion=NAME, registry=registry)
    got = plan.allocate("cpu")
    plan.run(state)
    assert plan["model.layers.0.mlp.gate.weight"].kept == "router gate"
    for name in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"):
        q, m, e = conversion.convert(state[name])
        assert torch.equal(_bits(got[name + "_q"]), _bits(q))
        assert torch.equal(_bits(got[name + "_scale"]), _bits(m.unsqueeze(-1)))
        assert got[name + "_shift"].shape == (*e.shape, 1) and torch.equal(_bits(got[name + "_shift"]), _bits(e))


# --------------------------------------------------------------------------- a replicated companion


def with_tensor_max(conversion: cc.Conversion) -> cc.Conversion:
    """The toy format plus a third companion of one value per tensor (``replicated``): max |x|.

    Not the plugin's format (it would make rows sharded refuse, see test_toy_distributed.py);
    it probes how the core treats a one-per-tensor output next to per-row ones.
    """
    import conversion_core_toy_two_scales as toy

    def fn(src: torch.Tensor, q: torch.Tensor, m: torch.Tensor, e: torch.Tensor, g: torch.Tensor) -> None:
        toy.quantize(src, q, m, e)
        g.copy_(src.float().abs().amax().reshape(1))

    return cc.Conversion(
        name="toy_with_tensor_max",
        fn=fn,
        requires_scale=True,
        outputs=(*conversion.outputs, cc.Output("weight_max", torch.float32, lambda s: (1,), placement="replicated")),
        compile_target="toy_with_tensor_max",
        dequantize=lambda q, m, e, g: toy.dequantize(q, m, e),
        src_ndims=(2, 3),
    )


def test_replicated_companion_passes_the_kit(conversion: cc.Conversion) -> None:
    check_conversion(with_tensor_max(conversion), error_bound=TOY_BOUND)


def test_fused_shards_share_a_one_per_tensor_companion(conversion: cc.Conversion) -> None:
    """Rows converted on their own let a fused gate_up_proj go in one call, so a one-per-tensor
    companion covers gate and up together: what fused sets need (engines' fused kernels read one
    global scale for gate and up, as llm-compressor writes it)."""
    from conversion_core.plan import geometry

    variant = with_tensor_max(conversion)
    assert geometry.rows_independent(variant, 6)
    assert geometry.shards_align(variant, (2, 4, 6), (2, 2))


def test_py_typed_is_installed() -> None:
    import importlib.resources

    assert importlib.resources.files("conversion_core_toy_two_scales").joinpath("py.typed").is_file()


def test_launch_writes_the_bytes_of_fn_and_flags_non_finite(conversion: cc.Conversion) -> None:
    """``launch`` (the whole-model step's sync-free twin) writes ``fn``'s bytes and, instead of
    raising, adds a NaN/Inf source to the device flag."""
    src = (torch.randn(2, 33, 70, generator=torch.Generator().manual_seed(5)) * 4).bfloat16()
    want = conversion.convert(src)
    got = conversion.allocate(tuple(src.shape), "cpu")
    flag = torch.zeros(1, dtype=torch.int32)
    conversion.launch(src, *got, flag)
    assert flag.item() == 0
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g.view(torch.uint8), w.view(torch.uint8))
    src[1, 2, 3] = float("nan")
    conversion.launch(src, *got, flag)
    assert flag.item() == 1
