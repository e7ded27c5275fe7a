"""On a CUDA GPU: the example plugins' torch-only ``launch`` goes through the whole-model step,
captured in CUDA graphs, and writes the CPU path's bytes (no kernel of the plugin's own needed).

Skipped without CUDA, or when the examples are not installed.
"""

from __future__ import annotations

import pytest
import torch

import conversion_core as cc
from conversion_core.plan import build_plan

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
EXAMPLES = ("fp8_per_tensor", "toy_two_scales")


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"model.norm.weight": (64,), "model.embed_tokens.weight": (100, 64)}
    for n in range(3):
        shapes[f"model.layers.{n}.self_attn.q_proj.weight"] = (64, 64)
        shapes[f"model.layers.{n}.mlp.up_proj.weight"] = (200, 64)
        shapes[f"model.layers.{n}.mlp.experts.down_proj"] = (4, 96, 64)
    return {k: (torch.randn(s, generator=g) * 2).bfloat16() for k, s in shapes.items()}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("name", EXAMPLES)
def test_captured_step_writes_cpu_bytes(name: str) -> None:
    if name not in cc.load_registry().names():
        pytest.skip(f"{name} is not installed")
    cpu_state = _state(0)
    cpu_plan = build_plan(cpu_state, conversion=name)
    cpu_plan.allocate("cpu")
    gpu_state = {k: v.cuda() for k, v in cpu_state.items()}
    plan = build_plan(gpu_state, conversion=name)
    plan.allocate("cuda")
    for step in range(4):  # eager, eager (same addresses), captured, replayed
        fresh = _state(step + 1)
        for k in cpu_state:
            cpu_state[k].copy_(fresh[k])
            gpu_state[k].copy_(fresh[k])
        want = cpu_plan.run(cpu_state)
        got = plan.run(gpu_state)
        assert sorted(got) == sorted(want)
        for k, w in want.items():
            assert torch.equal(_bits(got[k]), _bits(w)), (name, step, k)
    assert plan._step is not None and all(seg.graph is not None for seg in plan._step.segments), "never captured"
    gpu_state["model.layers.2.mlp.up_proj.weight"][1, 1] = float("inf")  # in place: the graph replays
    with pytest.raises(cc.ConversionInputError, match=r"model\.layers\.2\.mlp\.up_proj\.weight"):
        plan.run(gpu_state)
