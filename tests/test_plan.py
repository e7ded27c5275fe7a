"""The whole-model plan: decisions, scale names and shapes, fused shards, buffers refilled in place."""

from __future__ import annotations

import json

import pytest
import torch
from plan_expectations import (
    E4M3,
    assert_within_e4m3,
    check_block,
    check_channel,
    expand_blocks,
    expected_block_scales,
    needs_builtin_plugins,
    same_bytes,
)

import conversion_core as cc
from conversion_core.plan import TensorSpec, build_plan, matches_module

BLOCK = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
CHANNEL = {"quant_method": "fp8", "activation_scheme": "dynamic"}  # the seed's per-channel reading
CT_CHANNEL = {
    "quant_method": "compressed-tensors",
    "format": "float-quantized",
    "config_groups": {
        "g": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False},
            "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True},
        }
    },
    "ignore": ["lm_head", "re:.*o_proj$"],
}
CT_BLOCK = json.loads(json.dumps(CT_CHANNEL))
CT_BLOCK["config_groups"]["g"]["weights"].update(strategy="block", block_structure=[128, 128])
CT_BLOCK["ignore"] = []

E, I, H = 3, 160, 256  # noqa: E741 (the issue's names) 2*ceil(160/128) = 4 scale rows, not ceil(320/128) = 3

pytestmark = needs_builtin_plugins


def moe_specs(dtype: torch.dtype = torch.bfloat16) -> dict[str, TensorSpec]:
    """Names as transformers 5 holds a Qwen3-MoE-like model (fused experts), plus per-expert and odd tensors."""
    s = {
        "model.embed_tokens.weight": (512, H),
        "model.layers.0.input_layernorm.weight": (H,),
        "model.layers.0.self_attn.q_proj.weight": (256, H),
        "model.layers.0.self_attn.q_proj.bias": (256,),
        "model.layers.0.self_attn.v_proj.weight": (128, H),
        "model.layers.0.self_attn.o_proj.weight": (H, 256),
        "model.layers.0.mlp.gate.weight": (E, H),
        "model.layers.0.mlp.shared_expert_gate.weight": (1, H),
        "model.layers.0.mlp.shared_expert.gate_proj.weight": (200, H),
        "model.layers.0.mlp.experts.gate_up_proj": (E, 2 * I, H),
        "model.layers.0.mlp.experts.down_proj": (E, H, I),
        "model.layers.1.mlp.experts.0.gate_proj.weight": (I, H),
        "model.layers.1.mlp.experts.0.down_proj.weight": (H, I),
        "model.norm.weight": (H,),
        "lm_head.weight": (512, H),
    }
    return {k: TensorSpec(v, dtype) for k, v in s.items()}


def random_state(specs: dict[str, TensorSpec], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s.shape, generator=gen).mul_(0.1).to(s.dtype) for k, s in specs.items()}


QUANTIZED = {
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.v_proj.weight",
    "model.layers.0.self_attn.o_proj.weight",
    "model.layers.0.mlp.shared_expert.gate_proj.weight",
    "model.layers.0.mlp.experts.gate_up_proj",
    "model.layers.0.mlp.experts.down_proj",
    "model.layers.1.mlp.experts.0.gate_proj.weight",
    "model.layers.1.mlp.experts.0.down_proj.weight",
}


def test_published_fp8_checkpoints_keep_embeddings_head_norms_biases_and_router_gates():
    plan = build_plan(moe_specs(), BLOCK)
    assert {e.name for e in plan.quantized} == QUANTIZED
    kept = {e.name: e.kept for e in plan.kept}
    assert set(kept) == set(moe_specs()) - QUANTIZED
    assert kept["model.embed_tokens.weight"] == "embedding"
    assert kept["lm_head.weight"] == "lm_head"
    assert kept["model.layers.0.mlp.gate.weight"] == "router gate"
    assert kept["model.layers.0.mlp.shared_expert_gate.weight"] == "router gate"
    assert kept["model.norm.weight"] == "1-D tensor"
    for entry in plan.kept:  # kept tensors stay in their own dtype, through the exact copy
        assert entry.conversion.dst_dtype == torch.bfloat16 and entry.scale_name is None
        assert entry.tags == {"compile_target": "hf_raw", "compile_metadata": {}}


@pytest.mark.parametrize(
    ("qc", "extra_kept"),
    [
        # q, k and v are one fused layer in the engines: ignored together or not at all
        (
            {**BLOCK, "modules_to_not_convert": [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]},
            {"q_proj", "v_proj"},
        ),
        (
            {**BLOCK, "ignored_layers": ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp.experts"]},
            {"o_proj", "gate_up_proj", "down_proj"},
        ),
        (CT_CHANNEL, {"o_proj"}),
    ],
)
def test_the_configs_ignore_lists_are_kept(qc, extra_kept):
    plan = build_plan(moe_specs(), qc)
    quantized = {e.name for e in plan.quantized}
    newly_kept = QUANTIZED - quantized
    last = {n.removesuffix(".weight").rsplit(".", 1)[-1] for n in newly_kept}
    assert last == extra_kept
    assert all(plan[n].kept.startswith("ignored by config") for n in newly_kept)


def test_plain_ignore_entries_match_whole_dotted_components_only():
    assert matches_module("mlp.gate", "model.layers.3.mlp.gate.weight")
    assert not matches_module("gate", "model.layers.3.mlp.gate_proj.weight")
    assert not matches_module("q_pro", "model.layers.0.self_attn.q_proj.weight")
    assert matches_module("re:.*layers\\.3\\.", "model.layers.3.mlp.down_proj.weight")
    assert not matches_module("re:layers", "model.layers.3.mlp.down_proj.weight")  # anchored at the start
    with pytest.raises(cc.ConfigError, match="regular expression"):
        matches_module("re:(", "a.weight")


@pytest.mark.parametrize(
    ("qc", "suffix", "fused_suffix", "q_proj_scale"),
    [
        (BLOCK, ".weight_scale_inv", "_scale_inv", (2, 2)),
        (CHANNEL, ".weight_scale", "_scale", (256,)),
        (CT_CHANNEL, ".weight_scale", "_scale", (256, 1)),
        (CT_BLOCK, ".weight_scale", "_scale", (2, 2)),
    ],
)
def test_scale_names_and_shapes_follow_the_checkpoint_format(qc, suffix, fused_suffix, q_proj_scale):
    plan = build_plan(moe_specs(), qc)
    q = plan["model.layers.0.self_attn.q_proj.weight"]
    assert q.scale_name == "model.layers.0.self_attn.q_proj" + suffix
    assert q.scale_shape == q_proj_scale
    fused = plan["model.layers.0.mlp.experts.gate_up_proj"]
    assert fused.scale_name == "model.layers.0.mlp.experts.gate_up_proj" + fused_suffix
    outputs = plan.allocate("cpu")
    assert tuple(outputs[q.scale_name].shape) == q_proj_scale
    assert outputs[q.name].dtype == E4M3


def test_fused_gate_up_blocks_never_straddle_the_boundary():
    specs = {"model.layers.0.mlp.experts.gate_up_proj": TensorSpec((E, 2 * I, H), torch.bfloat16)}
    state = random_state(specs, 1)
    w = state["model.layers.0.mlp.experts.gate_up_proj"]
    w[:, I:] *= 40  # up is much larger than gate: a shared block would ruin gate's precision
    plan = build_plan(specs, BLOCK)
    out = plan.allocate("cpu")
    plan.run(state)
    q, scale = out["model.layers.0.mlp.experts.gate_up_proj"], out["model.layers.0.mlp.experts.gate_up_proj_scale_inv"]
    assert tuple(scale.shape) == (E, 4, 2)  # (E, 2*ceil(I/128), ceil(H/128)), as vLLM expects
    for e in range(E):
        for half in range(2):
            rows = slice(half * I, (half + 1) * I)
            check_block(w[e, rows], q[e, rows], scale[e, 2 * half : 2 * half + 2])
    deq = plan.dequantize("model.layers.0.mlp.experts.gate_up_proj")
    for e in range(E):
        full = torch.cat([expand_blocks(scale[e, 2 * h : 2 * h + 2], I, H) for h in range(2)])
        assert torch.equal(deq[e], q[e].float() * full)


def test_fused_gate_up_per_channel_scales_are_one_per_row():
    specs = {"model.layers.0.mlp.experts.gate_up_proj": TensorSpec((E, 2 * I, H), torch.float32)}
    state = random_state(specs, 5)
    plan = build_plan(specs, CT_CHANNEL)
    out = plan.allocate("cpu")
    plan.run(state)
    w = state["model.layers.0.mlp.experts.gate_up_proj"]
    q, scale = out["model.layers.0.mlp.experts.gate_up_proj"], out["model.layers.0.mlp.experts.gate_up_proj_scale"]
    assert tuple(scale.shape) == (E, 2 * I, 1)
    for e in range(E):
        check_channel(w[e], q[e], scale[e])


def test_fused_shard_sizes_can_be_declared_and_are_checked():
    name = "model.layers.0.mlp.w13"
    specs = {name + ".weight": TensorSpec((300, 256), torch.float32)}
    plan = build_plan(specs, BLOCK, fused_shards={"mlp.w13.weight": [100, 200]})
    entry = plan[name + ".weight"]
    assert entry.shards == (100, 200) and entry.scale_shape == (1 + 2, 2)
    state = random_state(specs, 2)
    out = plan.allocate("cpu")
    plan.run(state)
    x, q, s = state[name + ".weight"], out[name + ".weight"], out[name + ".weight_scale_inv"]
    check_block(x[:100], q[:100], s[:1])
    check_block(x[100:], q[100:], s[1:])
    with pytest.raises(ValueError, match="sum to its 300 rows"):
        build_plan(specs, BLOCK, fused_shards={"mlp.w13.weight": [100, 100]})
    odd = {"m.experts.gate_up_proj": TensorSpec((2, 161, 64), torch.bfloat16)}
    with pytest.raises(ValueError, match="equal fused shards"):
        build_plan(odd, BLOCK)
    assert build_plan(odd, BLOCK, fused_shards={})["m.experts.gate_up_proj"].scale_shape == (2, 2, 1)


def test_run_refills_the_same_buffers_with_fresh_bytes():
    specs = moe_specs()
    plan = build_plan(specs, BLOCK)
    outputs = plan.allocate("cpu")
    pointers = {n: t.data_ptr() for n, t in outputs.items()}
    arena = plan.arena.data_ptr()
    first = plan.run(random_state(specs, 10))
    before = {n: t.clone() for n, t in first.items()}
    state = random_state(specs, 11)
    second = plan.run(state)
    assert plan.ready
    assert {n: t.data_ptr() for n, t in second.items()} == pointers  # no new output allocation
    assert plan.arena.data_ptr() == arena
    for name, tensor in second.items():
        assert not same_bytes(tensor, before[name]), f"{name} was not refilled"
    for name in specs:
        entry = plan[name]
        if entry.kept:
            assert same_bytes(second[name], state[name])
        elif len(entry.src_shape) == 2:
            check_block(state[name], second[name], second[entry.scale_name])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_run_on_cuda_allocates_nothing_that_outlives_the_step():
    specs = moe_specs()
    plan = build_plan(specs, BLOCK)
    plan.allocate("cuda")
    state = {k: v.cuda() for k, v in random_state(specs, 3).items()}
    plan.run(state)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    plan.run(state)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before
    q = plan.outputs["model.layers.0.self_attn.q_proj.weight"].cpu()
    s = plan.outputs["model.layers.0.self_attn.q_proj.weight_scale_inv"].cpu()
    check_block(state["model.layers.0.self_attn.q_proj.weight"].cpu(), q, s)


def _bad_states(specs):
    good = random_state(specs, 21)
    last = list(specs)[-1]
    missing = dict(good)
    del missing["model.layers.0.self_attn.o_proj.weight"]
    yield "missing", missing, "missing from the state dict"
    yield "extra", {**good, "model.extra.weight": torch.zeros(2, 2)}, "does not know"
    yield "shape", {**good, last: torch.zeros(511, H, dtype=torch.bfloat16)}, "the plan expects shape"
    yield "dtype", {**good, last: good[last].float()}, "dtype float32"
    yield "device", {**good, last: good[last].to("meta")}, "device meta"
    yield "type", {**good, last: good[last].float().tolist()}, "expected a torch.Tensor"


@pytest.mark.parametrize("case", ["missing", "extra", "shape", "dtype", "device", "type"])
def test_every_input_is_validated_before_anything_is_written(case):
    specs = moe_specs()
    plan = build_plan(specs, BLOCK)
    plan.allocate("cpu")
    snapshot = {n: t.clone() for n, t in plan.run(random_state(specs, 20)).items()}
    _, state, message = next(c for c in _bad_states(specs) if c[0] == case)
    with pytest.raises(cc.ConversionCoreError, match=message):
        plan.run(state)
    assert not plan.ready
    for name, tensor in plan.outputs.items():
        assert same_bytes(tensor, snapshot[name]), f"{name} was written before validation failed"


def test_nan_in_one_weight_raises_naming_it_and_leaves_the_plan_not_ready():
    specs = moe_specs()
    plan = build_plan(specs, CHANNEL)
    plan.allocate("cpu")
    state = random_state(specs, 30)
    state["model.layers.0.mlp.experts.down_proj"][1, 5, 7] = float("nan")
    with pytest.raises(ValueError, match="model.layers.0.mlp.experts.down_proj"):
        plan.run(state)
    assert not plan.ready
    state["model.layers.0.mlp.experts.down_proj"][1, 5, 7] = 0.0
    outputs = plan.run(state)
    assert plan.ready
    x, q = state["model.layers.0.self_attn.v_proj.weight"], outputs["model.layers.0.self_attn.v_proj.weight"]
    check_channel(x, q, outputs["model.layers.0.self_attn.v_proj.weight_scale"])


@pytest.mark.parametrize("qc", [BLOCK, CT_CHANNEL])
def test_every_output_carries_its_conversions_tags(qc):
    plan = build_plan(moe_specs(), qc)
    outputs = plan.allocate("cpu")
    tags = plan.output_tags()
    assert set(tags) == set(outputs)
    target = {"fp8_128x128": "deep_gemm_fp8", "cutlass_fp8_e4m3_per_channel": "cutlass_fp8"}[plan.conversion.name]
    for entry in plan.entries:
        for name in entry.output_names:
            if entry.kept:
                assert cc.accepts(tags[name], ["hf_raw"]) and not cc.accepts(tags[name], [target])
            else:
                assert cc.accepts(tags[name], [target], {"dtype": "e4m3"})
                assert not cc.accepts(tags[name], ["hf_raw"])


def test_manifest_lists_every_tensor_with_its_format():
    plan = build_plan(moe_specs(), BLOCK)
    manifest = json.loads(json.dumps(plan.manifest()))
    assert manifest["conversion"] == "fp8_128x128"
    rows = {row["name"]: row for row in manifest["tensors"]}
    assert set(rows) == set(moe_specs())
    fused = rows["model.layers.0.mlp.experts.gate_up_proj"]
    assert fused["shape"] == [E, 2 * I, H] and fused["dtype"] == "float8_e4m3fn"
    assert fused["scale_name"] == "model.layers.0.mlp.experts.gate_up_proj_scale_inv"
    assert fused["scale_shape"] == [E, 4, 2] and fused["fused_shards"] == [I, I]
    assert fused["compile_target"] == "deep_gemm_fp8"
    assert fused["compile_metadata"] == {"block_size": [128, 128], "scale_layout": "blockwise", "dtype": "e4m3"}
    head = rows["lm_head.weight"]
    assert head["kept"] == "lm_head" and head["dtype"] == "bfloat16" and head["scale_name"] is None
    assert head["compile_target"] == "hf_raw"


def test_conversion_named_explicitly_or_unknown_or_missing():
    specs = moe_specs()
    plan = build_plan(specs, conversion="cutlass_fp8_e4m3_per_channel")
    assert plan["lm_head.weight"].kept == "lm_head"
    assert plan["model.layers.0.self_attn.q_proj.weight"].scale_shape == (256,)
    with pytest.raises(KeyError, match="no_such_format"):
        build_plan(specs, conversion="no_such_format")
    with pytest.raises(ValueError, match="inference config or an explicit conversion"):
        build_plan(specs)
    with pytest.raises(ValueError, match="float64"):
        build_plan({"a.weight": TensorSpec((4, 4), torch.float64)}, BLOCK)


def test_a_plain_cast_applies_to_every_float_tensor():
    specs = moe_specs(torch.float32)
    specs["model.layers.0.step"] = TensorSpec((), torch.int64)
    plan = build_plan(specs, {})  # no quantization_config: bf16_cast
    state = random_state(specs, 40)
    out = plan.allocate("cpu")
    plan.run(state)
    assert plan["model.layers.0.step"].kept == "non-float dtype int64"
    for name, x in state.items():
        if name == "model.layers.0.step":
            assert same_bytes(out[name], x)
        else:
            assert out[name].dtype == torch.bfloat16 and torch.equal(out[name], x.to(torch.bfloat16))


def test_plans_accept_tensors_meta_tensors_and_shape_dtype_pairs():
    a = build_plan({"x.weight": torch.empty(256, 128, device="meta")}, BLOCK)
    b = build_plan({"x.weight": ((256, 128), torch.float32)}, BLOCK)
    assert a["x.weight"].scale_shape == b["x.weight"].scale_shape == (2, 1)
    with pytest.raises(TypeError, match="x.weight"):
        build_plan({"x.weight": "not a tensor"}, BLOCK)


def test_block_error_bound_helper_is_not_vacuous():
    x = torch.randn(130, 140)
    scale = expected_block_scales(x)
    q = torch.zeros(130, 140, dtype=E4M3)
    with pytest.raises(AssertionError):
        assert_within_e4m3(x, q, expand_blocks(scale, 130, 140))


def test_an_ignore_entry_the_engines_read_differently_is_refused():
    """``self_attn.o_proj`` is a suffix: transformers skips every o_proj, vLLM none (issue 19, class 3)."""
    with pytest.raises(cc.ConfigError, match="transformers skips .* vLLM converts"):
        build_plan(moe_specs(), {**BLOCK, "ignored_layers": ["self_attn.o_proj"]})


def test_compressed_tensors_targets_decide_what_is_quantized():
    """Only what a config group targets is quantized; the rest stays as it is."""
    qc = json.loads(json.dumps(CT_CHANNEL))
    qc["config_groups"]["g"]["targets"] = ["re:.*mlp\\..*"]
    qc["ignore"] = []
    plan = build_plan(moe_specs(), qc)
    assert {e.name for e in plan.quantized} == {n for n in QUANTIZED if ".mlp." in n}
    assert plan["model.layers.0.self_attn.o_proj.weight"].kept == "not in config_groups targets"
