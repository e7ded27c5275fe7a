"""DTensor sources on gloo (CPU), 2 and 4 processes: bytes equal the unsharded conversion exactly.

Each world is started once (a module fixture) and runs every case of that world; each case is a
separate pytest test reading its rank-by-rank outcome, so a failure names the case and rank.
Expectations are independent of the sharded code: the unsharded conversion of the full tensor,
cut by ``distribute_tensor(..., src_data_rank=None)`` (DTensor's own local slicing, no
communication) under the placements the test states; scales of outlier blocks are computed here.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import pytest
import torch

# Imported here, before the workers fork, so the children share them (seconds of CPU each).
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor, init_device_mesh
from torch.distributed.tensor.debug import CommDebugMode

import conversion_core as cc
from conversion_core import testing as kit
from conversion_core.plan import sharded as distributed

BLOCK = "fp8_128x128"
CHANNEL = "cutlass_fp8_e4m3_per_channel"
CAST = "bf16_cast"


@dataclass(frozen=True)
class Case:
    name: str
    mesh: tuple[int, ...]
    conversion: str
    shape: tuple[int, ...]
    placements: tuple[str, ...]  # "S0", "S1", "S2", "R" per mesh dim
    scale_placements: tuple[str, ...] | None  # expected placements of the scale DTensor
    all_reduces: int  # expected all-reduce count (0: shards own whole blocks, no communication)
    dtype: torch.dtype = torch.bfloat16
    outlier: tuple[int, ...] | None = None  # index of a 1000.0 only one shard sees
    outlier_block: tuple[int, ...] | None = None  # scale index whose value must be 1000/448
    extra: dict = field(default_factory=dict, hash=False)


def _cases_2() -> list[Case]:
    return [
        # 128x128 blocks
        Case(
            "block_S0_cut_outlier", (2,), BLOCK, (300, 256), ("S0",), ("R",), 1, outlier=(200, 5), outlier_block=(1, 0)
        ),
        Case(
            "block_S0_cut_outlier_lower",
            (2,),
            BLOCK,
            (300, 256),
            ("S0",),
            ("R",),
            1,
            outlier=(140, 3),
            outlier_block=(1, 0),
        ),
        Case("block_S1_cut", (2,), BLOCK, (256, 260), ("S1",), ("R",), 1, outlier=(10, 131), outlier_block=(0, 1)),
        Case("block_S0_aligned_uneven", (2,), BLOCK, (255, 200), ("S0",), ("S0",), 0),
        Case("block_S1_aligned", (2,), BLOCK, (136, 512), ("S1",), ("S1",), 0),
        Case("block_R", (2,), BLOCK, (200, 136), ("R",), ("R",), 0, dtype=torch.float32),
        Case("block_3d_S0_experts_uneven", (2,), BLOCK, (3, 130, 140), ("S0",), ("S0",), 0),
        Case(
            "block_3d_S1_cut",
            (2,),
            BLOCK,
            (2, 200, 136),
            ("S1",),
            ("R",),
            1,
            outlier=(1, 101, 7),
            outlier_block=(1, 0, 0),
        ),
        Case("block_3d_S2_cut_fp16", (2,), BLOCK, (2, 136, 300), ("S2",), ("R",), 1, dtype=torch.float16),
        Case("block_empty_shard", (2,), BLOCK, (1, 300), ("S0",), ("R",), 1),
        # per-channel
        Case(
            "channel_S1_K_outlier", (2,), CHANNEL, (64, 300), ("S1",), ("R",), 1, outlier=(7, 250), outlier_block=(7,)
        ),
        Case("channel_S0_N_uneven", (2,), CHANNEL, (77, 96), ("S0",), ("S0",), 0),
        Case("channel_3d_S0", (2,), CHANNEL, (3, 40, 50), ("S0",), ("S0",), 0),
        Case(
            "channel_3d_S2_K", (2,), CHANNEL, (2, 40, 33), ("S2",), ("R",), 1, outlier=(1, 3, 30), outlier_block=(1, 3)
        ),
        Case("channel_R", (2,), CHANNEL, (40, 50), ("R",), ("R",), 0),
        # casts
        Case("cast_S0_uneven", (2,), CAST, (33, 20), ("S0",), None, 0, dtype=torch.float32),
        Case("cast_3d_S2", (2,), CAST, (3, 8, 10), ("S2",), None, 0, dtype=torch.float32),
        Case("cast_R", (2,), CAST, (5, 7), ("R",), None, 0, dtype=torch.float16),
    ]


def _cases_4() -> list[Case]:
    return [
        Case("block_S0_mesh4_cut", (4,), BLOCK, (300, 140), ("S0",), ("R",), 1, outlier=(290, 2), outlier_block=(2, 0)),
        Case("channel_S1_mesh4_uneven", (4,), CHANNEL, (16, 202), ("S1",), ("R",), 1),
        Case(
            "block_2d_S0_S1_cut",
            (2, 2),
            BLOCK,
            (300, 260),
            ("S0", "S1"),
            ("R", "R"),
            2,
            outlier=(160, 200),
            outlier_block=(1, 1),
        ),
        Case("block_2d_S0_S1_aligned", (2, 2), BLOCK, (256, 511), ("S0", "S1"), ("S0", "S1"), 0),
        Case(
            "block_2d_experts_and_K_cut",
            (2, 2),
            BLOCK,
            (3, 136, 200),
            ("S0", "S2"),
            ("S0", "R"),
            1,
            outlier=(2, 5, 120),
            outlier_block=(2, 0, 0),
        ),
        Case(
            "block_2d_N_aligned_K_cut",
            (2, 2),
            BLOCK,
            (256, 300),
            ("S0", "S1"),
            ("S0", "R"),
            1,
            outlier=(3, 140),
            outlier_block=(0, 1),
        ),
        Case("block_2d_nested_S0_S0", (2, 2), BLOCK, (520, 136), ("S0", "S0"), ("R", "R"), 2),
        Case("block_2d_R_S1_cut", (2, 2), BLOCK, (136, 200), ("R", "S1"), ("R", "R"), 1),
        Case(
            "channel_2d_N_and_K",
            (2, 2),
            CHANNEL,
            (30, 70),
            ("S0", "S1"),
            ("S0", "R"),
            1,
            outlier=(29, 69),
            outlier_block=(29,),
        ),
        Case("cast_2d", (2, 2), CAST, (9, 11), ("S1", "S0"), None, 0, dtype=torch.float32),
    ]


def _source(case: Case) -> torch.Tensor:
    gen = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))
    full = (torch.randn(case.shape, generator=gen) * 3).to(case.dtype)
    if case.outlier is not None:
        full[case.outlier] = 1000.0
    return full


def _run_case(case: Case, mesh) -> None:
    conv = cc.load_registry().get(case.conversion)
    full = _source(case)
    placements = kit.dtensor_placements(case.placements)
    src = distribute_tensor(full, mesh, placements, src_data_rank=None)
    with CommDebugMode() as comm:
        out, scale = conv.convert(src)
    ref_out, ref_scale = conv.convert(full)

    assert comm.get_total_counts() == case.all_reduces, f"{comm.get_total_counts()} collectives"
    assert tuple(out.shape) == tuple(full.shape) and out.dtype == conv.dst_dtype
    assert tuple(out.placements) == tuple(placements), out.placements
    assert torch.equal(kit.as_bytes(out.to_local()), kit.local_bytes(ref_out, out)), "q bytes differ from the unsharded"
    if case.scale_placements is None:
        assert scale is None and ref_scale is None
        return
    assert tuple(scale.placements) == tuple(kit.dtensor_placements(case.scale_placements)), scale.placements
    assert tuple(scale.shape) == tuple(ref_scale.shape)
    want_scale = distribute_tensor(ref_scale, mesh, kit.dtensor_placements(case.scale_placements), src_data_rank=None)
    assert torch.equal(kit.as_bytes(scale.to_local()), kit.as_bytes(want_scale.to_local())), "scales differ"
    gathered = scale.full_tensor()
    assert torch.equal(kit.as_bytes(gathered), kit.as_bytes(ref_scale))
    if case.outlier_block is not None:  # independent of both code paths: the outlier sets its block's scale
        assert gathered[case.outlier_block].item() == (torch.tensor(1000.0) / 448.0).item()


def _check_plan(mesh, placements: dict, default: list, all_reduces: dict[str, int]) -> None:
    """A tiny MoE layer through the plan as DTensors == the plan over the full tensors, byte for byte."""
    from conversion_core.plan import build_plan

    gen = torch.Generator().manual_seed(11)
    fulls = {
        "model.embed_tokens.weight": torch.randn(64, 32, generator=gen).bfloat16(),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(300, 200, generator=gen).bfloat16(),
        "model.layers.0.mlp.gate.weight": torch.randn(4, 200, generator=gen).bfloat16(),
        "model.layers.0.mlp.experts.gate_up_proj": torch.randn(4, 200, 200, generator=gen).bfloat16(),
        "model.layers.0.mlp.experts.down_proj": torch.randn(4, 200, 100, generator=gen).bfloat16(),
        "model.norm.weight": torch.randn(32, generator=gen).bfloat16(),
    }
    fulls["model.layers.0.mlp.experts.gate_up_proj"][3, 150, 7] = 1000.0  # up half (I = 100 cuts a block)
    fulls["model.layers.0.mlp.experts.down_proj"][1, 10, 90] = -1000.0  # one shard's part of a cut block
    sharded = {k: distribute_tensor(v, mesh, placements.get(k, default), src_data_rank=None) for k, v in fulls.items()}
    sharded["model.norm.weight"] = fulls["model.norm.weight"]  # FSDP2 leaves buffers plain: a plain tensor
    column = cc.TargetFormat(output_names=("weight", "weight_scale"), stored_shape=lambda i, s: (*s, 1) if i else s)
    for conversion, naming in ((BLOCK, None), (CHANNEL, column)):
        if conversion not in all_reduces:
            continue
        ref_plan = build_plan(fulls, conversion=conversion, target=naming)
        ref_plan.allocate("cpu")
        want = ref_plan.run(fulls)
        plan = build_plan(sharded, conversion=conversion, target=naming)
        plan.allocate(like=sharded)
        with CommDebugMode() as comm:
            got = plan.run(sharded)
        assert comm.get_total_counts() == all_reduces[conversion], (conversion, comm.get_total_counts())
        assert plan.ready and sorted(got) == sorted(want) and len(want) == len(fulls) + 3
        for key, ref in want.items():
            if key == "model.norm.weight":
                assert not isinstance(got[key], DTensor) and torch.equal(kit.as_bytes(got[key]), kit.as_bytes(ref))
                continue
            assert isinstance(got[key], DTensor) and tuple(got[key].shape) == tuple(ref.shape), key
            assert torch.equal(kit.as_bytes(got[key].to_local()), kit.local_bytes(ref, got[key])), (conversion, key)
        with pytest.raises(cc.ConversionInputError, match="full_tensor"):
            plan.dequantize("model.layers.0.self_attn.q_proj.weight")
        arena = plan.arena
        plan.run(sharded)  # the same buffers, refilled
        assert plan.arena is arena
        local = {k: v.to_local() if isinstance(v, DTensor) else v for k, v in plan.outputs.items()}
        assert all(
            local[k].data_ptr() == (v.to_local() if isinstance(v, DTensor) else v).data_ptr() for k, v in got.items()
        )


def _run_extra(name: str, mesh, rank: int) -> None:
    """Cases that are not one conversion of one layout: buffers, batching, failures."""
    reg = cc.load_registry()
    block, channel, cast = reg.get(BLOCK), reg.get(CHANNEL), reg.get(CAST)
    gen = torch.Generator().manual_seed(7)
    if name == "prealloc_fn":
        full = torch.randn(300, 200, generator=gen).bfloat16()
        src = distribute_tensor(full, mesh, [Shard(0)], src_data_rank=None)
        out, scale = distributed.allocate(block, src)
        block.fn(src, out, scale)
        ref_out, ref_scale = block.convert(full)
        assert torch.equal(kit.as_bytes(out.to_local()), kit.local_bytes(ref_out, out))
        assert torch.equal(kit.as_bytes(scale.to_local()), kit.local_bytes(ref_scale, scale))
        with pytest.raises(cc.ConversionTypeError, match="must be a DTensor"):
            block.fn(src, torch.empty(300, 200, dtype=torch.float8_e4m3fn), scale)
        with pytest.raises(cc.ConversionInputError, match="placements"):
            block.fn(src, out, distribute_tensor(ref_scale, mesh, [Shard(0)], src_data_rank=None))
    elif name == "convert_many_one_allreduce":
        fulls = [torch.randn(300, 136, generator=gen).bfloat16(), torch.randn(2, 140, 300, generator=gen).bfloat16()]
        fulls.append(torch.randn(64, 90, generator=gen))
        items = [
            (block, distribute_tensor(fulls[0], mesh, [Shard(0)], src_data_rank=None), None, None),
            (block, distribute_tensor(fulls[1], mesh, [Shard(2)], src_data_rank=None), None, None),
            (channel, distribute_tensor(fulls[2], mesh, [Shard(1)], src_data_rank=None), None, None),
            (channel, distribute_tensor(fulls[2], mesh, [Shard(0)], src_data_rank=None), None, None),  # no comm
            (cast, distribute_tensor(fulls[2], mesh, [Shard(1)], src_data_rank=None), None, None),
        ]
        with CommDebugMode() as comm:
            results = distributed.convert_many(items)
        assert comm.get_total_counts() == 1
        for full, (conv, _, _, _), (out, scale) in zip([*fulls[:3], fulls[2], fulls[2]], items, results, strict=True):
            ref_out, ref_scale = conv.convert(full)
            assert torch.equal(kit.as_bytes(out.to_local()), kit.local_bytes(ref_out, out)), conv.name
            if ref_scale is not None:
                assert torch.equal(kit.as_bytes(scale.to_local()), kit.local_bytes(ref_scale, scale)), conv.name
    elif name == "nan_raises_on_every_rank":
        full = torch.randn(300, 256, generator=gen).bfloat16()
        full[200, 3] = float("nan")  # rank 1's half of a block rank 0 also holds
        src = distribute_tensor(full, mesh, [Shard(0)], src_data_rank=None)
        with pytest.raises(cc.ConversionInputError, match=r"\(300, 256\).*NaN or Inf"):
            block.convert(src)
        full = torch.randn(16, 300, generator=gen)
        full[3, 0] = float("inf")  # rank 0's part of row 3
        src = distribute_tensor(full, mesh, [Shard(1)], src_data_rank=None)
        with pytest.raises(cc.ConversionInputError, match="NaN or Inf"):
            channel.convert(src)
    elif name == "nan_aligned_raises_where_held":
        full = torch.randn(256, 128, generator=gen).bfloat16()
        full[200, 3] = float("inf")  # rank 1's own blocks: no communication, rank 1 raises
        src = distribute_tensor(full, mesh, [Shard(0)], src_data_rank=None)
        if rank == 1:
            with pytest.raises(cc.ConversionInputError, match="NaN or Inf"):
                block.convert(src)
        else:
            block.convert(src)
        with CommDebugMode() as comm, pytest.raises(cc.ConversionInputError, match=r"item 1 .*NaN or Inf"):
            distributed.convert_many(
                [
                    (
                        block,
                        distribute_tensor(torch.zeros(256, 128).bfloat16(), mesh, [Replicate()], src_data_rank=None),
                        None,
                        None,
                    ),
                    (block, src, None, None),
                ],
                raise_on_all_ranks=True,
            )
        assert comm.get_total_counts() == 1  # the flags only: these shards own whole blocks
    elif name == "refuses_partial":
        src = DTensor.from_local(torch.ones(4, 8), mesh, [Partial()], run_check=False)
        with pytest.raises(cc.ConversionInputError, match="Partial"):
            block.convert(src)
        src = distribute_tensor(torch.ones(4, 8), mesh, [Replicate()], src_data_rank=None)
        fp32 = reg.get("fp32_cast").replace(name="custom", compile_target="custom_layout")
        with pytest.raises(cc.ConversionInputError, match="custom"):
            fp32.convert(src)
    elif name == "plan_dtensor_state_dict":
        # 1-D mesh: every reduced tensor shares mesh dim 0, so each step is one all-reduce
        _check_plan(
            mesh,
            {"model.layers.0.mlp.experts.down_proj": [Shard(2)], "model.norm.weight": [Replicate()]},
            default=[Shard(0)],
            all_reduces={BLOCK: 1, CHANNEL: 1},
        )
        with pytest.raises(cc.ConversionInputError, match="fused rows"):
            _check_plan(
                mesh,
                {"model.layers.0.mlp.experts.gate_up_proj": [Shard(1)]},
                default=[Shard(0)],
                all_reduces={BLOCK: 1},
            )
    else:
        raise AssertionError(f"unknown extra case {name}")


EXTRA_2 = [
    "prealloc_fn",
    "convert_many_one_allreduce",
    "nan_raises_on_every_rank",
    "nan_aligned_raises_where_held",
    "refuses_partial",
    "plan_dtensor_state_dict",
]


def _body(rank: int, world: int, results: kit.WorldResults) -> None:
    meshes: dict[tuple[int, ...], object] = {}
    for case in _cases_2() if world == 2 else _cases_4():
        if case.mesh not in meshes:
            meshes[case.mesh] = init_device_mesh("cpu", case.mesh)
        kit.record(results, case.name, _run_case, case, meshes[case.mesh])
    if world == 4:  # 2x2: q_proj reduces over both mesh dims, down_proj over dim 1: two groups, 2 + 1 all-reduces
        placements = {
            "model.layers.0.self_attn.q_proj.weight": [Shard(0), Shard(1)],
            "model.layers.0.mlp.experts.down_proj": [Shard(0), Shard(2)],
            "model.norm.weight": [Replicate(), Replicate()],
        }
        all_reduces = {BLOCK: 3, CHANNEL: 1}
        kit.record(
            results, "plan_2d_mesh", _check_plan, meshes[(2, 2)], placements, [Shard(0), Replicate()], all_reduces
        )
    if world == 2:
        for name in EXTRA_2:
            kit.record(results, name, _run_extra, name, meshes[(2,)], rank)


def _run_world(world: int) -> list[kit.WorldResults]:
    return kit.run_gloo_world(_body, world, deadline_s=600)


def _needs_builtin_plugins() -> None:
    """Runs in every nox session: without the built-in plugins there is nothing to shard."""
    missing = [n for n in (BLOCK, CHANNEL, CAST) if n not in cc.load_registry().names()]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (plugin not installed or not allowed)")


@pytest.fixture(scope="module")
def world2() -> list[kit.WorldResults]:
    _needs_builtin_plugins()
    return _run_world(2)


@pytest.fixture(scope="module")
def world4() -> list[kit.WorldResults]:
    _needs_builtin_plugins()
    return _run_world(4)


def _check(results: list[kit.WorldResults], name: str) -> None:
    failures = kit.world_failures(results, name)
    assert not failures, failures


@pytest.mark.parametrize("name", [c.name for c in _cases_2()] + EXTRA_2)
def test_two_processes(world2: list[kit.WorldResults], name: str) -> None:
    _check(world2, name)


@pytest.mark.parametrize("name", [c.name for c in _cases_4()] + ["plan_2d_mesh"])
def test_four_processes(world4: list[kit.WorldResults], name: str) -> None:
    _check(world4, name)


def test_import_does_not_load_dtensor() -> None:
    """``import conversion_core`` must not pay for torch.distributed.tensor (about 1.6 s)."""
    import subprocess
    import sys

    code = "import sys, conversion_core as cc; cc.load_registry(); print('torch.distributed.tensor' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"
