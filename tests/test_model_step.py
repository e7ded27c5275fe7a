"""A whole-model step writes the bytes of converting each tensor on its own.

The step runs through each conversion's ``launch`` (queued kernels, one NaN/Inf flag read at the
end) when the backend picks Triton; on CPU that is Triton's interpreter, so a normal pytest run
re-runs this file in a child with ``TRITON_INTERPRET=1`` and ``CONVERSION_CORE_BACKEND=triton``
(like tests/test_triton_interpret.py) and also runs it here, on the tensor-by-tensor path. The
expectation is always the torch path, one tensor (one fused shard) at a time.
CUDA graph capture is CUDA-only: tests/gpu/test_model_step_gpu.py covers it.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import conversion_core as cc
from conversion_core.errors import ConversionCoreError
from conversion_core.plan import Plan, build_plan

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("CONVERSION_CORE_BACKEND") == "triton"
FORMATS = ["fp8_128x128", "cutlass_fp8_e4m3_per_channel"]
HIDDEN, EXPERTS = 256, 2


def small_moe(fused: bool, inter: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """One Qwen3-MoE-shaped layer (names as transformers writes them), random bf16 values."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape: int) -> torch.Tensor:
        scale = torch.exp(torch.empty(*shape[:-1], 1).uniform_(-4, 4, generator=g))
        return (torch.randn(*shape, generator=g) * scale).to(torch.bfloat16)

    sd = {"model.embed_tokens.weight": w(64, HIDDEN), "lm_head.weight": w(64, HIDDEN), "model.norm.weight": w(HIDDEN)}
    for i in range(1):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = w(HIDDEN)
        sd[p + "self_attn.q_proj.weight"] = w(128, HIDDEN)
        sd[p + "self_attn.k_proj.weight"] = w(128, HIDDEN)
        sd[p + "self_attn.o_proj.weight"] = w(HIDDEN, 128)
        sd[p + "mlp.gate.weight"] = w(EXPERTS, HIDDEN)
        if fused:
            sd[p + "mlp.experts.gate_up_proj"] = w(EXPERTS, 2 * inter, HIDDEN)
            sd[p + "mlp.experts.down_proj"] = w(EXPERTS, HIDDEN, inter)
        else:
            for j in range(EXPERTS):
                for proj, shape in (
                    ("gate_proj", (inter, HIDDEN)),
                    ("up_proj", (inter, HIDDEN)),
                    ("down_proj", (HIDDEN, inter)),
                ):
                    sd[p + f"mlp.experts.{j}.{proj}.weight"] = w(*shape)
    return sd


def expected_outputs(
    plan: Plan, sd: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> dict[str, torch.Tensor]:
    """Each tensor converted on its own by the torch path; fused stacks shard by shard, per expert."""
    monkeypatch.setenv("CONVERSION_CORE_BACKEND", "torch")
    conversion = plan.conversion
    want: dict[str, torch.Tensor] = {}
    for name, src in sd.items():
        entry = plan[name]
        if entry.kept is not None:
            want[name] = src.clone()
            continue
        assert entry.scale_name is not None
        if name.endswith("gate_up_proj"):
            halves = [conversion.convert(half.contiguous()) for half in src.chunk(2, dim=-2)]
            want[name] = torch.cat([q for q, _ in halves], dim=-2)
            scales = [s for _, s in halves]
            assert scales[0] is not None  # rows grow along the scale's -2 (blocks) or -1 (per row)
            scale = torch.cat(scales, dim=-2 if scales[0].dim() == src.dim() else -1)  # type: ignore[arg-type]
        else:
            want[name], scale = conversion.convert(src)
        want[entry.scale_name] = scale.reshape(entry.scale_shape)  # type: ignore[union-attr]
    monkeypatch.setenv("CONVERSION_CORE_BACKEND", "triton" if INTERPRETING else "auto")
    return want


def assert_same_bytes(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].shape == tensor.shape and got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name].view(torch.uint8), tensor.view(torch.uint8)), f"{name}: bytes differ"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("layout", ["per_expert", "fused", "fused_unaligned"])
def test_step_bytes_equal_converting_each_tensor(fmt: str, layout: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # inter 128: gate/up shards on 128-row block boundaries (one call per stack); 96: shard by shard
    sd = small_moe(fused=layout != "per_expert", inter=96 if layout == "fused_unaligned" else 128)
    plan = build_plan(sd, conversion=fmt)
    plan.allocate("cpu")
    for out in plan.outputs.values():
        out.view(torch.uint8).fill_(0x7F)  # poison: NaN bytes wherever the step writes nothing
    if INTERPRETING:  # the step must go through the launch path: the tensor-by-tensor one is refused
        monkeypatch.setattr(Plan, "_run_checked", lambda self, sd: pytest.fail("launch path not taken"))
    got = plan.run(sd)
    assert plan.ready
    monkeypatch.undo()
    assert_same_bytes(got, expected_outputs(plan, sd, monkeypatch))
    if INTERPRETING:
        return  # the in-place update is replayed on GPU (tests/gpu); the interpreter is slow
    sd2 = small_moe(fused=layout != "per_expert", inter=96 if layout == "fused_unaligned" else 128, seed=1)
    for name, t in sd.items():  # a trainer's update: in place, same addresses
        t.copy_(sd2[name])
    assert_same_bytes(plan.run(sd), expected_outputs(plan, sd, monkeypatch))


@pytest.mark.parametrize("fmt", FORMATS)
def test_non_finite_names_the_tensor_and_leaves_plan_not_ready(fmt: str) -> None:
    sd = small_moe(fused=False, inter=128)
    plan = build_plan(sd, conversion=fmt)
    plan.allocate("cpu")
    plan.run(sd)
    bad = "model.layers.0.mlp.experts.1.up_proj.weight"
    sd[bad][5, 7] = float("nan")
    with pytest.raises(ConversionCoreError, match=r"layers\.0\.mlp\.experts\.1\.up_proj\.weight"):
        plan.run(sd)
    assert not plan.ready


def test_conversion_launch_must_be_callable() -> None:
    with pytest.raises(cc.ConversionCoreError, match="launch must be callable"):
        cc.Conversion(name="x", fn=lambda s, o, sc: None, requires_scale=False, launch=3)  # type: ignore[arg-type]


if not INTERPRETING:

    def test_launch_path_under_triton_interpreter() -> None:
        pytest.importorskip("triton")
        env = dict(os.environ, TRITON_INTERPRET="1", CONVERSION_CORE_BACKEND="triton")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", __file__]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
        assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-2000:]
