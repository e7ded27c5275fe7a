"""The captured CUDA step: bytes of converting each tensor on its own; launched eagerly at first
and while sources move, captured once they stay, replayed after in-place updates; only the
segments whose sources moved change; a source changed in place in a late segment is refused; the
tensor holding a NaN is named. Skipped without CUDA."""

from __future__ import annotations

import operator
import re

import pytest
import torch

from conversion_core.errors import ConversionCoreError
from conversion_core.plan import build_plan
from conversion_core.plan.graph_step import segment_bounds

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

FORMATS = ["fp8_128x128", "cutlass_fp8_e4m3_per_channel"]
H, E = 512, 4


def moe(fused: bool, inter: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)

    def w(*shape: int) -> torch.Tensor:
        scale = torch.exp(torch.empty(*shape[:-1], 1, device="cuda").uniform_(-4, 4, generator=g))
        return (torch.randn(*shape, generator=g, device="cuda") * scale).to(torch.bfloat16)

    sd = {"model.embed_tokens.weight": w(100, H), "model.norm.weight": w(H)}
    for i in range(2):
        p = f"model.layers.{i}."
        sd[p + "self_attn.q_proj.weight"] = w(384, H)
        sd[p + "mlp.gate.weight"] = w(E, H)
        if fused:
            sd[p + "mlp.experts.gate_up_proj"] = w(E, 2 * inter, H)
            sd[p + "mlp.experts.down_proj"] = w(E, H, inter)
        else:
            for j in range(E):
                sd[p + f"mlp.experts.{j}.gate_proj.weight"] = w(inter, H)
                sd[p + f"mlp.experts.{j}.up_proj.weight"] = w(inter, H)
                sd[p + f"mlp.experts.{j}.down_proj.weight"] = w(H, inter)
    return sd


def expected(plan, sd):
    """Each tensor (each fused gate/up half) converted on its own through the checked fn."""
    conversion, want = plan.conversion, {}
    for name, src in sd.items():
        entry = plan[name]
        if entry.kept is not None:
            want[name] = src.clone()
            continue
        if name.endswith("gate_up_proj"):
            halves = [conversion.convert(h.contiguous()) for h in src.chunk(2, dim=-2)]
            want[name] = torch.cat([q for q, _ in halves], dim=-2)
            scales = [s for _, s in halves]
            scale = torch.cat(scales, dim=-2 if scales[0].dim() == src.dim() else -1)
        else:
            want[name], scale = conversion.convert(src)
        want[entry.scale_name] = scale.reshape(entry.scale_shape)
    return want


def assert_same_bytes(got, want):
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert torch.equal(got[name].view(torch.uint8), t.view(torch.uint8)), name


def graphs(plan):
    assert plan._step is not None, "the CUDA step was not captured"
    return [seg.graph for seg in plan._step.segments]


def refill(sd, seed):
    """A trainer's in-place update: new values, same tensors."""
    for name, t in moe_like(sd, seed).items():
        sd[name].copy_(t)


def moe_like(sd, seed):
    fused = any(n.endswith("gate_up_proj") for n in sd)
    inter = next(t.shape[-1] for n, t in sd.items() if n.endswith("down_proj") or n.endswith("down_proj.weight"))
    return moe(fused, inter, seed)


def captured_plan(fmt: str = FORMATS[0], first_segment: int = 32):
    """A per-expert plan after two steps on the same tensors: every segment captured."""
    sd = moe(False, 256, seed=0)
    plan = build_plan(sd, conversion=fmt)
    plan.graph_first_segment = first_segment
    plan.allocate("cuda")
    plan.run(sd)
    plan.run(sd)
    assert all(graphs(plan))
    return plan, sd


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("fused", "inter"), [(False, 768), (True, 768), (True, 200)])
@pytest.mark.parametrize("first_segment", [32, 1])
def test_captured_step(fmt: str, fused: bool, inter: int, first_segment: int) -> None:
    sd = moe(fused, inter, seed=0)
    plan = build_plan(sd, conversion=fmt)
    plan.graph_first_segment = first_segment
    plan.allocate("cuda")
    assert_same_bytes(plan.run(sd), expected(plan, sd))  # launched eagerly: nothing captured yet
    assert not any(graphs(plan))
    refill(sd, seed=1)
    assert_same_bytes(plan.run(sd), expected(plan, sd))  # same addresses again: captured
    before = graphs(plan)
    assert all(before) and len(before) == len(segment_bounds(len(sd), first_segment))
    assert first_segment == 32 or len(before) > 1
    refill(sd, seed=2)
    assert_same_bytes(plan.run(sd), expected(plan, sd))  # replayed
    assert all(map(operator.is_, graphs(plan), before))
    for seed in (3, 4):  # new addresses every step: launched eagerly, right bytes, no graph
        moved = {n: t.clone() for n, t in moe_like(sd, seed).items()}
        assert_same_bytes(plan.run(moved), expected(plan, moved))
        assert not any(graphs(plan)) and plan.ready


@pytest.mark.parametrize("fmt", FORMATS)
def test_only_the_segment_whose_source_moved_is_captured_again(fmt: str) -> None:
    plan, sd = captured_plan(fmt, first_segment=2)  # 30 tensors: segments of 2, 8, 20
    before = graphs(plan)
    last = list(sd)[-1]
    sd[last] = sd[last] * 3  # a new tensor in the last segment only
    assert_same_bytes(plan.run(sd), expected(plan, sd))  # its segment launched eagerly
    assert [a is b for a, b in zip(graphs(plan), before, strict=True)] == [True] * (len(before) - 1) + [False]
    refill(sd, seed=1)
    assert_same_bytes(plan.run(sd), expected(plan, sd))  # seen again: captured
    after = graphs(plan)
    assert all(after) and all(map(operator.is_, after[:-1], before[:-1]))
    refill(sd, seed=2)  # replayed; the new graph reads the new tensor
    assert_same_bytes(plan.run(sd), expected(plan, sd))
    assert all(map(operator.is_, graphs(plan), after))


def test_source_changed_in_place_in_a_late_segment_is_refused() -> None:
    plan, sd = captured_plan(first_segment=2)
    before = graphs(plan)
    name = list(sd)[-1]
    rows = sd[name].shape[0]
    sd[name].data = sd[name].data[: rows // 2]  # the same object, same address, half the rows
    with pytest.raises(ConversionCoreError, match=rf"{re.escape(name)}.*shape \({rows // 2}, "):
        plan.run(sd)
    assert not plan.ready
    sd[name].data = torch.empty(rows, sd[name].shape[1], dtype=torch.bfloat16, device="cuda").normal_()
    assert_same_bytes(plan.run(sd), expected(plan, sd))  # moved: its segment launched eagerly
    assert plan.ready
    assert [a is b for a, b in zip(graphs(plan), before, strict=True)] == [True] * (len(before) - 1) + [False]


def test_captured_step_revalidates_a_replaced_tensor() -> None:
    plan, sd = captured_plan()
    name = "model.layers.0.self_attn.q_proj.weight"
    sd[name] = sd[name][:128]  # same address, another shape: never replayed on it
    with pytest.raises(ConversionCoreError, match=r"q_proj\.weight.*shape \(128, 512\)"):
        plan.run(sd)
    assert not plan.ready


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "name",
    [
        "model.layers.0.self_attn.q_proj.weight",  # the second of three segments (2, 8, 20 tensors)
        "model.layers.1.mlp.experts.3.down_proj.weight",  # the last segment
    ],
)
def test_captured_step_names_non_finite_tensor(fmt: str, name: str) -> None:
    plan, sd = captured_plan(fmt, first_segment=2)
    before = graphs(plan)
    good = sd[name][7, 9].item()
    sd[name][7, 9] = float("inf")
    with pytest.raises(ConversionCoreError, match=re.escape(repr(name))):
        plan.run(sd)
    assert not plan.ready
    sd[name][7, 9] = good  # the next clean step is replayed, and its flag read clean
    assert_same_bytes(plan.run(sd), expected(plan, sd))
    assert plan.ready and all(map(operator.is_, graphs(plan), before))


def test_changing_the_graph_settings_captures_anew() -> None:
    plan, sd = captured_plan()
    assert len(graphs(plan)) == 1
    plan.graph_first_segment = 2
    assert_same_bytes(plan.run(sd), expected(plan, sd))
    assert len(graphs(plan)) == len(segment_bounds(len(sd), 2)) > 1
    assert not any(graphs(plan))  # launched; captured at the next step
    plan.run(sd)
    assert all(graphs(plan))
