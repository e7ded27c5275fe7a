"""DTensor sources on gloo (CPU), 2 and 4 processes: NVFP4 bytes equal the unsharded conversion exactly.

NVFP4 has two statistics, and a shard can cut either:

- the per-16 group amax (``weight_scale``): a shard boundary inside a group (K = 48 over 4 ranks:
  12 columns each) must reduce the group's partial maxima across the ranks that share it;
- the tensor-wide amax (``weight_global_scale`` / ``weight_scale_2``), shared by a fused set
  (q/k/v, gate/up; a stacked ``experts.gate_up_proj`` is one tensor, its halves share it anyway):
  every shard of every member must be reduced before any block is quantized.

Both ride in the same batched all-reduce: one per step on a 1-D mesh (counted with
``CommDebugMode``). Each world runs every case once (a module fixture) and writes its outcome per
rank; each case is its own test. Expectations are independent of the sharded code: the unsharded
conversion of the full tensor (a fused set: of the members stacked into one tensor, whose rows
convert independently under one amax), cut by ``distribute_tensor(..., src_data_rank=None)``
(DTensor's own slicing, no communication) and compared rank by rank (gloo cannot gather float8);
the global scale of an outlier case is also computed here from the format's definition.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import pytest
import torch

import conversion_core as cc

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

# Imported here, before the workers fork, so the children share them (seconds of CPU each).
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor, init_device_mesh  # noqa: E402
from torch.distributed.tensor.debug import CommDebugMode  # noqa: E402

from conversion_core import testing as kit  # noqa: E402
from conversion_core.plan import build_plan  # noqa: E402
from conversion_core.plan import sharded as distributed  # noqa: E402

NAMES = ("nvfp4", "nvfp4_modelopt")
#: Output names of each layout: values, group scales, the global scale (divisor / multiplier).
SUFFIXES = {
    "nvfp4": ("weight_packed", "weight_scale", "weight_global_scale"),
    "nvfp4_modelopt": ("weight", "weight_scale", "weight_scale_2"),
}
OUTLIER = 30.0
DEADLINE_S = 300


@dataclass(frozen=True)
class Case:
    name: str
    mesh: tuple[int, ...]
    shape: tuple[int, ...]
    placements: tuple[str, ...]  # "S0", "S1", "S2", "R" per mesh dim
    scale_placements: tuple[str, ...]  # expected placements of weight_scale
    all_reduces: int
    dtype: torch.dtype = torch.bfloat16
    outlier: tuple[int, ...] | None = None  # index of OUTLIER (only the rank holding it sees it)


def _cases_2() -> list[Case]:
    return [
        Case("cols_S1_cut", (2,), (6, 48), ("S1",), ("R",), 1, outlier=(4, 30)),  # 24 + 24: group 1 is cut
        Case("cols_S1_whole_groups", (2,), (5, 64), ("S1",), ("S1",), 1, outlier=(1, 40)),  # only the tensor amax
        Case("rows_S0_uneven", (2,), (7, 32), ("S0",), ("S0",), 1, outlier=(6, 3)),  # 4 + 3 rows
        Case("rows_S0_empty_shard", (2,), (1, 32), ("S0",), ("S0",), 1),  # rank 1 holds nothing
        Case("experts_S0_uneven", (2,), (3, 4, 32), ("S0",), ("S0",), 1, outlier=(2, 1, 5)),
        Case("experts_S1_gate_up_halves", (2,), (2, 8, 32), ("S1",), ("S1",), 1, outlier=(1, 6, 2)),  # up on rank 1
        Case("experts_S2_cut", (2,), (2, 5, 48), ("S2",), ("R",), 1, outlier=(1, 2, 40)),
        Case("cols_S1_cut_fp32", (2,), (4, 80), ("S1",), ("R",), 1, dtype=torch.float32),  # 40 + 40
        Case("cols_S1_cut_fp16", (2,), (3, 48), ("S1",), ("R",), 1, dtype=torch.float16),
        Case("replicated", (2,), (4, 32), ("R",), ("R",), 0),  # every rank holds the whole tensor
    ]


def _cases_4() -> list[Case]:
    return [
        Case("cols_S1_mesh4_cut", (4,), (6, 48), ("S1",), ("R",), 1, outlier=(5, 13)),  # 12 columns per rank
        Case("rows_S0_mesh4_uneven", (4,), (7, 32), ("S0",), ("S0",), 1, outlier=(6, 31)),  # 2, 2, 2, 1
        Case("rows_S0_mesh4_empty", (4,), (2, 16), ("S0",), ("S0",), 1),  # ranks 2 and 3 hold nothing
        Case("experts_S0_mesh4_empty", (4,), (3, 2, 32), ("S0",), ("S0",), 1, outlier=(2, 0, 0)),
        Case("experts_S2_mesh4_cut", (4,), (2, 3, 48), ("S2",), ("R",), 1, outlier=(0, 2, 47)),
        Case("replicated_mesh4", (4,), (3, 16), ("R",), ("R",), 0),
        # 2x2: the group grid reduces over mesh dim 1, the tensor amax over both mesh dims. The core
        # batches per (mesh, mesh dims): one all-reduce for the grid, one per mesh dim for the amax.
        Case("mesh2x2_S0_S1_cut", (2, 2), (6, 48), ("S0", "S1"), ("S0", "R"), 3, outlier=(5, 20)),
        Case("mesh2x2_S0_S1_whole", (2, 2), (4, 64), ("S0", "S1"), ("S0", "S1"), 2, outlier=(0, 63)),
        Case("mesh2x2_R_S1_cut", (2, 2), (3, 48), ("R", "S1"), ("R", "R"), 1, outlier=(2, 25)),
        Case("mesh2x2_experts_S0_S2_cut", (2, 2), (3, 2, 48), ("S0", "S2"), ("S0", "R"), 3, outlier=(2, 1, 30)),
        Case("mesh2x2_nested_S1_S1", (2, 2), (2, 64), ("S1", "S1"), ("R", "R"), 2),  # 16 per rank, one reduction
    ]


def _bf16(v: float) -> float:
    return float(torch.tensor(v, dtype=torch.float32).to(torch.bfloat16).float())


def _ref_global(amax: float, name: str) -> float:
    """The global scale from its definition: ``bf16(bf16(1 / bf16(amax)) * 2688)``, ModelOpt's fl32(1 / that)."""
    gs = _bf16(_bf16(1.0 / _bf16(amax)) * 2688.0)
    return gs if name == "nvfp4" else float(torch.tensor(1.0 / gs, dtype=torch.float32))


def _source(
    case_name: str, shape: tuple[int, ...], dtype: torch.dtype, outlier: tuple[int, ...] | None
) -> torch.Tensor:
    gen = torch.Generator().manual_seed(zlib.crc32(case_name.encode()))
    full = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
    if full.dim() and full.shape[-1] >= 16:
        full[..., :16] = 0  # zero groups: the 0.125 scale
    if outlier is not None:
        full[outlier] = OUTLIER
    return full


def _check_outputs(got: tuple, want: tuple, placements: list, scale_placements: list, what: str) -> None:
    """Values as the source, group scales as stated, the global scale replicated."""
    kit.assert_sharded_outputs(got, want, [placements, scale_placements, [Replicate()] * len(placements)], what)


def _run_case(name: str, case: Case, mesh) -> None:
    conv = cc.load_registry().get(name)
    full = _source(case.name, case.shape, case.dtype, case.outlier)
    placements = kit.dtensor_placements(case.placements)
    src = distribute_tensor(full, mesh, placements, src_data_rank=None)
    with CommDebugMode() as comm:
        got = conv.convert(src)
    assert comm.get_total_counts() == case.all_reduces, f"{comm.get_total_counts()} collectives"
    want = conv.convert(full)
    _check_outputs(got, want, placements, kit.dtensor_placements(case.scale_placements), case.name)
    if case.outlier is not None:  # independent of both code paths: the outlier sets the global scale
        assert got[2].to_local().item() == _ref_global(OUTLIER, name)
        group = (*case.outlier[:-1], case.outlier[-1] // 16)
        assert float(want[1][group].float()) == 448.0  # gs * bf16(30 / 6) saturates e4m3


# ---- fused sets through convert_many ------------------------------------------------------------

#: (member, shape, placements on a 1-D mesh); K = 48 sharded cuts a group on 2 and 4 ranks.
FUSED = [
    [("q", (32, 48), "S1"), ("k", (16, 48), "S0"), ("v", (16, 48), "S1")],
    [("gate", (24, 48), "S0"), ("up", (24, 48), "S1")],
]


def _fused_sets_one_allreduce(name: str, mesh) -> None:
    """Members sharded differently, each set's max taken over every rank and member: one all-reduce."""
    conv = cc.load_registry().get(name)
    fulls, items, names, sets = [], [], [], []
    for s, members in enumerate(FUSED):
        sets.append(list(range(len(items), len(items) + len(members))))
        for m, (member, shape, p) in enumerate(members):
            full = _source(f"fused-{member}", shape, torch.bfloat16, None)
            if s == 1 and m == 1:
                full[-1, -1] = OUTLIER  # the last rank's part of `up` holds the set's amax
            fulls.append(full)
            items.append((conv, distribute_tensor(full, mesh, kit.dtensor_placements((p,)), src_data_rank=None)))
            names.append(member)
    with CommDebugMode() as comm:
        results = distributed.convert_many(items, names=names, shared_sets=sets)
    assert comm.get_total_counts() == 1, f"{comm.get_total_counts()} collectives"
    for members, indices in zip(FUSED, sets, strict=True):
        stacked = conv.convert(torch.cat([fulls[i] for i in indices]))  # one tensor, one amax: the set's bytes
        row = 0
        for (member, shape, p), i in zip(members, indices, strict=True):
            rows = slice(row, row + shape[0])
            row += shape[0]
            want = (stacked[0][rows], stacked[1][rows], stacked[2])
            placements = kit.dtensor_placements((p,))
            scale_placements = placements if p == "S0" else [Replicate()]
            _check_outputs(results[i], want, placements, scale_placements, member)
    assert results[sets[1][0]][2].to_local().item() == _ref_global(OUTLIER, name)


# ---- the whole plan -----------------------------------------------------------------------------


def _llama(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, scale: float = 0.02) -> torch.Tensor:
        return (torch.randn(shape, generator=g) * scale).bfloat16()

    state = {
        "model.embed_tokens.weight": r(64, 48),
        "model.layers.0.input_layernorm.weight": r(48),
        "model.layers.0.self_attn.q_proj.weight": r(48, 48),
        "model.layers.0.self_attn.k_proj.weight": r(16, 48, scale=0.1),
        "model.layers.0.self_attn.v_proj.weight": r(16, 48),
        "model.layers.0.self_attn.o_proj.weight": r(48, 48),
        "model.layers.0.mlp.gate_proj.weight": r(64, 48),
        "model.layers.0.mlp.up_proj.weight": r(64, 48),
        "model.layers.0.mlp.down_proj.weight": r(48, 64),
        "model.norm.weight": r(48),
        "lm_head.weight": r(64, 48),
    }
    state["model.layers.0.mlp.up_proj.weight"][63, 47] = OUTLIER  # the last rank's shard, either placement
    return state


LLAMA_PLACEMENTS = {  # a mix of TP-style column / row shards: K = 48 cut on every world
    "model.layers.0.self_attn.q_proj.weight": "S1",
    "model.layers.0.self_attn.k_proj.weight": "S0",
    "model.layers.0.self_attn.v_proj.weight": "S1",
    "model.layers.0.mlp.gate_proj.weight": "S1",
    "model.layers.0.mlp.down_proj.weight": "S1",
    "model.norm.weight": "R",
}


def _qwen3_moe(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, scale: float = 0.02) -> torch.Tensor:
        return (torch.randn(shape, generator=g) * scale).bfloat16()

    state = {
        "model.embed_tokens.weight": r(64, 48),
        "model.layers.0.self_attn.q_proj.weight": r(32, 48),
        "model.layers.0.self_attn.k_proj.weight": r(16, 48),
        "model.layers.0.self_attn.v_proj.weight": r(16, 48, scale=0.2),
        "model.layers.0.self_attn.o_proj.weight": r(48, 32),
        "model.layers.0.self_attn.q_norm.weight": r(16),
        "model.layers.0.self_attn.k_norm.weight": r(16),
        "model.layers.0.mlp.gate.weight": r(4, 48),
        "model.layers.0.mlp.experts.gate_up_proj": r(4, 32, 48),  # gate rows 0..15, up rows 16..31
        "model.layers.0.mlp.experts.down_proj": r(4, 48, 16),
        "model.layers.1.mlp.experts.0.gate_proj.weight": r(16, 48),  # the hub's per-expert layout
        "model.layers.1.mlp.experts.0.up_proj.weight": r(16, 48),
        "model.layers.1.mlp.experts.0.down_proj.weight": r(48, 16),
        "lm_head.weight": r(64, 48),
    }
    state["model.layers.0.mlp.experts.gate_up_proj"][1, 30, 2] = OUTLIER  # an up half
    return state


MOE_PLACEMENTS = {
    "model.layers.0.self_attn.q_proj.weight": "S1",
    "model.layers.0.self_attn.v_proj.weight": "S1",
    "model.layers.0.self_attn.q_norm.weight": "R",
    "model.layers.0.self_attn.k_norm.weight": "R",
    "model.layers.0.mlp.experts.gate_up_proj": "S1",  # the halves on different ranks
    "model.layers.0.mlp.experts.down_proj": "S0",  # expert parallel
    "model.layers.1.mlp.experts.0.up_proj.weight": "S1",
}


def _shard(fulls: dict, mesh, placements: dict[str, str], default: str = "S0") -> dict:
    spec = {k: kit.dtensor_placements((placements.get(k, default),) * mesh.ndim) for k in fulls}
    return {k: distribute_tensor(v, mesh, spec[k], src_data_rank=None) for k, v in fulls.items()}


def _check_plan(name: str, fulls: dict[str, torch.Tensor], sharded: dict, all_reduces: int) -> dict:
    """The plan over DTensors == the plan over the full tensors on CPU, every output, byte for byte."""
    ref_plan = build_plan(fulls, conversion=name)
    ref_plan.allocate("cpu")
    want = ref_plan.run(fulls)
    plan = build_plan(sharded, conversion=name)
    plan.allocate(like=sharded)
    with CommDebugMode() as comm:
        got = plan.run(sharded)
    assert comm.get_total_counts() == all_reduces, f"{comm.get_total_counts()} collectives"
    assert plan.ready and sorted(got) == sorted(want)
    for suffix in SUFFIXES[name]:  # every output kind is among those compared
        assert any(k.endswith(f".{suffix}") for k in want), suffix
    for key, ref in want.items():
        assert isinstance(got[key], DTensor) and tuple(got[key].shape) == tuple(ref.shape), key
        assert got[key].dtype == ref.dtype, key
        assert torch.equal(kit.as_bytes(got[key].to_local()), kit.local_bytes(ref, got[key])), key
    plan.run(sharded)  # the same buffers, refilled: still the same bytes
    for key, ref in want.items():
        assert torch.equal(kit.as_bytes(plan.outputs[key].to_local()), kit.local_bytes(ref, plan.outputs[key])), key
    return got


def _plan_checks(name: str, mesh) -> None:
    # 1-D mesh: grids and tensor amaxes share mesh dim 0, so the whole step is one all-reduce
    llama = _llama(1)
    out = _check_plan(name, llama, _shard(llama, mesh, LLAMA_PLACEMENTS), 1)
    # the set's global scale is the outlier's, on every member and rank (independent of both paths)
    for member in ("gate_proj", "up_proj"):
        key = f"model.layers.0.mlp.{member}.{SUFFIXES[name][2]}"
        assert out[key].to_local().item() == _ref_global(OUTLIER, name), key
    moe = _qwen3_moe(2)
    out = _check_plan(name, moe, _shard(moe, mesh, MOE_PLACEMENTS), 1)
    key = "model.layers.0.mlp.experts.gate_up_proj" + SUFFIXES[name][2].removeprefix("weight")
    assert out[key].to_local().item() == _ref_global(OUTLIER, name), key


def _plan_2d(name: str, mesh) -> None:
    """2x2: every tensor sharded on both mesh dims; grids reduce over mesh dim 1 (K cut), amaxes over both."""
    llama = _llama(3)
    spec = {**dict.fromkeys(llama, "S0"), **LLAMA_PLACEMENTS}
    both = {"S1": ("S1", "S1"), "R": ("R", "R"), "S0": ("S0", "S1")}
    placements = {k: ("S0", "R") if llama[k].dim() == 1 and v == "S0" else both[v] for k, v in spec.items()}
    sharded = {
        k: distribute_tensor(v, mesh, kit.dtensor_placements(placements[k]), src_data_rank=None)
        for k, v in llama.items()
    }
    # groups: (dims (1,)) the cut grids of ("S0", "S1"); (dims (0, 1)) the amaxes and nested grids: 1 + 2
    _check_plan(name, llama, sharded, 3)


# ---- non-finite sources -------------------------------------------------------------------------


def _nan_checks(name: str, mesh) -> None:
    """A NaN in the last rank's shard raises on every rank (no rank left waiting), naming the tensor."""
    conv = cc.load_registry().get(name)
    cases = [  # (shape, placement, index, value): cut groups (the grid's flag) and whole rows (the amax's)
        ((8, 48), "S1", (2, 47), float("nan")),
        ((8, 32), "S0", (7, 1), float("nan")),
        ((8, 32), "S0", (7, 1), float("inf")),  # once turned into float32's max: only its holder raised
        ((3, 4, 32), "S0", (2, 0, 0), float("-inf")),
    ]
    for shape, p, index, value in cases:
        full = _source("nan", shape, torch.bfloat16, None)
        full[index] = value
        src = distribute_tensor(full, mesh, kit.dtensor_placements((p,)), src_data_rank=None)
        with pytest.raises(cc.ConversionInputError, match=re.escape(str(shape)) + ".*NaN or Inf"):
            conv.convert(src)
    llama = _llama(4)
    for member, index in (("self_attn.k_proj", (15, 40)), ("self_attn.o_proj", (47, 47))):
        state = {k: v.clone() for k, v in llama.items()}
        state[f"model.layers.0.{member}.weight"][index] = float("inf")  # the last rank's shard
        sharded = _shard(state, mesh, LLAMA_PLACEMENTS)
        plan = build_plan(sharded, conversion=name)
        plan.allocate(like=sharded)
        with pytest.raises(cc.ConversionInputError, match=rf"{member}.*NaN or Inf"):
            plan.run(sharded)
        assert not plan.ready


# ---- the worlds ---------------------------------------------------------------------------------


def _extra_names(world: int) -> list[str]:
    names = [f"{n}-{c}" for n in NAMES for c in ("fused_sets_one_allreduce", "plan", "nan_raises_on_every_rank")]
    return names + ([f"{n}-plan_2x2" for n in NAMES] if world == 4 else [])


def _body(rank: int, world: int, results: kit.WorldResults) -> None:
    meshes: dict[tuple[int, ...], object] = {}
    cases = _cases_2() if world == 2 else _cases_4()
    for case in cases:
        if case.mesh not in meshes:
            meshes[case.mesh] = init_device_mesh("cpu", case.mesh)
    line = meshes[(world,)]
    for name in NAMES:
        for case in cases:
            kit.record(results, f"{name}-{case.name}", _run_case, name, case, meshes[case.mesh])
        kit.record(results, f"{name}-fused_sets_one_allreduce", _fused_sets_one_allreduce, name, line)
        kit.record(results, f"{name}-plan", _plan_checks, name, line)
        kit.record(results, f"{name}-nan_raises_on_every_rank", _nan_checks, name, line)
        if world == 4:
            kit.record(results, f"{name}-plan_2x2", _plan_2d, name, meshes[(2, 2)])


def _run_world(world: int) -> list[kit.WorldResults]:
    assert set(NAMES) <= set(cc.load_registry(reload=True).names()), "is conversion-core-nvfp4 installed?"
    return kit.run_gloo_world(_body, world, deadline_s=DEADLINE_S)


@pytest.fixture(scope="module")
def world2() -> list[kit.WorldResults]:
    return _run_world(2)


@pytest.fixture(scope="module")
def world4() -> list[kit.WorldResults]:
    return _run_world(4)


def _check(results: list[kit.WorldResults], key: str) -> None:
    failures = kit.world_failures(results, key)
    assert not failures, failures


@pytest.mark.parametrize("key", [f"{n}-{c.name}" for n in NAMES for c in _cases_2()] + _extra_names(2))
def test_two_processes(world2: list[kit.WorldResults], key: str) -> None:
    _check(world2, key)


@pytest.mark.parametrize("key", [f"{n}-{c.name}" for n in NAMES for c in _cases_4()] + _extra_names(4))
def test_four_processes(world4: list[kit.WorldResults], key: str) -> None:
    _check(world4, key)
