"""Class 2: wrong bytes never pass silently.

NaN, +Inf and -Inf injected into every kind of tensor a model holds (quantized 2-D weights,
stacked 3-D experts, fused gate_up stacks, kept norms, embeddings, lm_head, router gates, biases,
and every tensor of a plain cast) make ``Plan.run`` and ``convert`` raise naming that tensor, with
nothing published; a conversion function that returns a tensor instead of writing, or swaps or
resizes its buffer's storage, is caught by the checked ``fn``.
"""

from __future__ import annotations

import pytest
import torch
from plan_expectations import MOE_CONFIG, model_state, write_checkpoint

import conversion_core as cc
from conversion_core.apps.checkpoint import convert_checkpoint
from conversion_core.plan import build_plan

FORMATS = ["fp8_128x128", "cutlass_fp8_e4m3_per_channel", "bf16_cast"]
BAD = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}


def fused_state() -> dict[str, torch.Tensor]:
    """The MoE model plus stacked experts: (E, N, K) down and a fused (E, 2I, H) gate_up."""
    state = model_state(MOE_CONFIG, 5)
    g = torch.Generator().manual_seed(6)
    e, h, i = MOE_CONFIG["num_experts"], MOE_CONFIG["hidden_size"], MOE_CONFIG["moe_intermediate_size"]
    state["model.layers.9.mlp.experts.gate_up_proj"] = torch.randn(e, 2 * i, h, generator=g).to(torch.bfloat16)
    state["model.layers.9.mlp.experts.down_proj"] = torch.randn(e, h, i, generator=g).to(torch.bfloat16)
    state["model.layers.9.self_attn.q_proj.bias"] = torch.randn(h, generator=g).to(torch.bfloat16)
    return state


KINDS = {
    "quantized-2d": "model.layers.0.self_attn.q_proj.weight",
    "expert-2d": "model.layers.1.mlp.experts.2.down_proj.weight",
    "stacked-3d": "model.layers.9.mlp.experts.down_proj",
    "fused-gate-up": "model.layers.9.mlp.experts.gate_up_proj",
    "norm": "model.layers.0.input_layernorm.weight",
    "qk-norm": "model.layers.1.self_attn.k_norm.weight",
    "embedding": "model.embed_tokens.weight",
    "lm-head": "lm_head.weight",
    "router": "model.layers.0.mlp.gate.weight",
    "bias": "model.layers.9.self_attn.q_proj.bias",
    "final-norm": "model.norm.weight",
}


def poisoned(state: dict[str, torch.Tensor], name: str, value: float) -> dict[str, torch.Tensor]:
    out = dict(state)
    t = state[name].clone()
    t.view(-1)[t.numel() - 1] = value  # the last element: a partial edge block, the last expert
    out[name] = t
    return out


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return fused_state()


@pytest.mark.parametrize("conversion", FORMATS)
def test_non_finite_in_any_tensor_fails_the_step_naming_it(state, conversion):
    plan = build_plan(state, conversion=conversion)
    plan.allocate("cpu")
    plan.run(state)  # the clean state converts
    for name in KINDS.values():
        for value in BAD.values():
            with pytest.raises(cc.ConversionInputError, match=name.replace(".", r"\.")):
                plan.run(poisoned(state, name, value))
            plan.run(state)  # and the plan recovers on the next clean step


@pytest.mark.parametrize("conversion", FORMATS)
@pytest.mark.parametrize("kind", ["norm", "embedding", "router", "quantized-2d"])
def test_non_finite_in_a_checkpoint_publishes_nothing(tmp_path, state, conversion, kind):
    name = KINDS[kind]
    src = write_checkpoint(tmp_path / "src", MOE_CONFIG, poisoned(model_state(MOE_CONFIG, 5), name, float("nan")), 2)
    with pytest.raises(cc.ConversionInputError, match=name.replace(".", r"\.")):
        convert_checkpoint(src, tmp_path / "dst", conversion=conversion, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def _returns(src, out, scale_out):
    return src.float() * 2


def _set_storage(src, out, scale_out):
    out.set_(src.float().clone())


def _resize(src, out, scale_out):
    out.resize_(out.numel() + 1)


def _swap_scale(src, out, scale_out):
    out.copy_(src)
    scale_out.set_(torch.ones_like(scale_out))


@pytest.mark.parametrize(
    ("fn", "words"),
    [
        (_returns, "returned a Tensor"),
        (_set_storage, "moved or resized"),
        (_resize, "moved or resized"),
        (_swap_scale, "moved or resized"),
    ],  # fmt: skip
    ids=["returns-a-tensor", "set-storage", "resize", "swap-scale-storage"],
)
def test_the_checked_fn_notices_results_that_would_be_lost(fn, words):
    c = cc.Conversion(
        "zz_liar", fn, True, dst_dtype=torch.float32, scale_shape=lambda s: (s[0],), scale_name="s", compile_target="zz"
    )
    with pytest.raises(cc.ConversionTypeError, match=rf"'zz_liar'.*{words}"):
        c.convert(torch.randn(4, 8))


def test_a_fn_that_writes_nothing_fails_the_conformance_kit():
    from conversion_core.testing import check_conversion

    lazy = cc.Conversion("zz_lazy", lambda src, out, scale_out: None, False, dst_dtype=torch.float32)
    with pytest.raises(AssertionError, match="zz_lazy"):
        check_conversion(lazy)
