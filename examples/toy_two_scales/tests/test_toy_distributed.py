"""DTensor sources on gloo (CPU), 2 processes: the toy format's bytes equal the unsharded conversion.

One world is started once (a module fixture, with a deadline) and runs every case; each case is a
pytest test reading its rank-by-rank outcome. Expectations: the unsharded conversion of the full
tensor, cut by ``distribute_tensor(..., src_data_rank=None)`` (DTensor's own slicing, no
communication) under the placements the test states; the row scale of an outlier only one rank
sees is computed here.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import pytest
import torch

import conversion_core as cc

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

# Imported before the workers fork, so the children share them.
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor, init_device_mesh  # noqa: E402
from torch.distributed.tensor.debug import CommDebugMode  # noqa: E402

from conversion_core import testing as kit  # noqa: E402
from conversion_core.plan import build_plan  # noqa: E402

NAME = "toy_two_scales"
WORLD = 2
#: The whole world's deadline; the process group's own timeout is shorter.
DEADLINE_S = 240


@dataclass(frozen=True)
class Case:
    name: str
    shape: tuple[int, ...]
    placement: str  # "S0", "S1", "S2", "R"
    companions: str  # expected placement of weight_scale / weight_shift
    all_reduces: int
    dtype: torch.dtype = torch.bfloat16
    outlier: tuple[int, ...] | None = None  # a 1000.0 only one rank sees


CASES = [
    Case("rows_S0", (64, 48), "S0", "S0", 0),
    Case("rows_S0_uneven", (77, 33), "S0", "S0", 0, dtype=torch.float32),
    Case("rows_S0_one_row", (1, 300), "S0", "S0", 0),  # rank 1 holds no row
    Case("cols_S1_outlier", (64, 300), "S1", "R", 1, outlier=(7, 250)),
    Case("cols_S1_uneven", (33, 77), "S1", "R", 1, dtype=torch.float16, outlier=(32, 1)),
    Case("cols_S1_one_col", (16, 1), "S1", "R", 1),  # rank 1 holds no column
    Case("experts_S0_uneven", (3, 40, 50), "S0", "S0", 0),
    Case("experts_S1_rows", (2, 9, 10), "S1", "S1", 0),
    Case("experts_S2_cols", (2, 40, 33), "S2", "R", 1, outlier=(1, 3, 30)),
    Case("replicated", (40, 50), "R", "R", 0),
]
EXTRA = [
    "preallocated_fn",
    "nan_raises_on_every_rank",
    "plan_like_dtensor_state",
    "replicated_companion_rows_refused",
    "replicated_companion_cols",
]


def _source(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return (torch.randn(shape, generator=gen) * 3).to(dtype)


def _check_same(got: tuple, want: tuple, src_placements: list, companion_placements: list) -> None:
    placements = [src_placements] + [companion_placements] * (len(want) - 1)
    kit.assert_sharded_outputs(got, want, placements, "toy", gathered=True)


def _run_case(case: Case, mesh) -> None:
    conv = cc.load_registry().get(NAME)
    full = _source(case.name, case.shape, case.dtype)
    if case.outlier is not None:
        full[case.outlier] = 1000.0
    placements = kit.dtensor_placements(case.placement)
    src = distribute_tensor(full, mesh, placements, src_data_rank=None)
    with CommDebugMode() as comm:
        got = conv.convert(src)
    assert comm.get_total_counts() == case.all_reduces, f"{comm.get_total_counts()} collectives"
    want = conv.convert(full)
    _check_same(got, want, placements, kit.dtensor_placements(case.companions))
    if case.outlier is not None:  # independent of both code paths: the outlier sets its row's scale
        row = case.outlier[:-1]
        s = torch.tensor(1000.0) / torch.tensor(127.0)
        m, e = math.frexp(s.item())
        assert (got[1].full_tensor()[row].item(), got[2].full_tensor()[row].item()) == (m, e)
        assert got[0].full_tensor()[case.outlier].item() == 127


def _llama(gen: torch.Generator) -> dict[str, torch.Tensor]:
    h, i = 40, 66
    return {
        "model.embed_tokens.weight": torch.randn(50, h, generator=gen).bfloat16(),
        "model.layers.0.input_layernorm.weight": torch.randn(h, generator=gen).bfloat16(),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(h, h, generator=gen).bfloat16(),
        "model.layers.0.self_attn.o_proj.weight": torch.randn(h, h, generator=gen).bfloat16(),
        "model.layers.0.mlp.gate_proj.weight": torch.randn(i, h, generator=gen).bfloat16(),
        "model.layers.0.mlp.up_proj.weight": torch.randn(i, h, generator=gen).bfloat16(),
        "model.layers.0.mlp.down_proj.weight": torch.randn(h, i, generator=gen).bfloat16(),
        "model.norm.weight": torch.randn(h, generator=gen).bfloat16(),
        "lm_head.weight": torch.randn(50, h, generator=gen).bfloat16(),
    }


def _with_tensor_max() -> cc.Conversion:
    """The toy format plus one value per tensor (``replicated``), to show why the plugin has none:
    rows sharded (per-row blocks owned whole, no reduction) cannot give every rank the tensor's max."""
    import conversion_core_toy_two_scales as toy

    def fn(src, q, m, e, g):  # type: ignore[no-untyped-def]
        toy.quantize(src, q, m, e)
        g.copy_(src.float().abs().amax().reshape(1))

    def apply(x, amax, grid, q, m, e, g):  # type: ignore[no-untyped-def]
        toy.apply_sharded(x, amax, grid, q, m, e)
        g.copy_(grid.amax().reshape(1))  # the grid holds every row's global amax here

    base = cc.load_registry().get(NAME)
    return cc.Conversion(
        name="toy_with_tensor_max",
        fn=fn,
        requires_scale=True,
        outputs=(*base.outputs, cc.Output("weight_max", torch.float32, lambda s: (1,), placement="replicated")),
        compile_target="toy_with_tensor_max",
        dequantize=lambda q, m, e, g: toy.dequantize(q, m, e),
        src_ndims=(2, 3),
        sharded=cc.BlockAmax(block=toy.statistic_block, apply=apply),
    )


def _run_extra(name: str, mesh, rank: int) -> None:
    from conversion_core.plan import sharded

    conv = cc.load_registry().get(NAME)
    gen = torch.Generator().manual_seed(9)
    if name == "preallocated_fn":
        for placement in ("S0", "S1"):
            full = torch.randn(31, 45, generator=gen).bfloat16()
            src = distribute_tensor(full, mesh, kit.dtensor_placements(placement), src_data_rank=None)
            buffers = sharded.allocate(conv, src)
            conv.fn(src, *buffers)
            companions = kit.dtensor_placements("S0" if placement == "S0" else "R")
            _check_same(buffers, conv.convert(full), kit.dtensor_placements(placement), companions)
    elif name == "nan_raises_on_every_rank":
        full = torch.randn(16, 300, generator=gen)
        full[3, 250] = float("nan")  # rank 1's part of row 3: the row's all-reduce carries the flag
        src = distribute_tensor(full, mesh, [Shard(1)], src_data_rank=None)
        with pytest.raises(cc.ConversionInputError, match=r"\(16, 300\).*NaN or Inf"):
            conv.convert(src)
    elif name == "plan_like_dtensor_state":
        fulls = _llama(gen)
        fulls["model.layers.0.mlp.down_proj.weight"][4, 60] = -1000.0  # rank 1's part of row 4
        placements = {
            "model.layers.0.self_attn.o_proj.weight": [Shard(1)],
            "model.layers.0.mlp.down_proj.weight": [Shard(1)],
            "model.layers.0.mlp.up_proj.weight": [Replicate()],
        }
        state = {
            k: distribute_tensor(v, mesh, placements.get(k, [Shard(0)]), src_data_rank=None) for k, v in fulls.items()
        }
        state["model.norm.weight"] = fulls["model.norm.weight"]  # FSDP2 leaves buffers plain
        ref = build_plan(fulls, conversion=NAME)
        ref.allocate("cpu")
        want = ref.run(fulls)
        plan = build_plan(state, conversion=NAME)
        got = plan.allocate(like=state)
        assert sorted(got) == sorted(want) and len(want) == len(fulls) + 2 * 5
        arena = plan.arena
        for step in range(2):  # the same buffers, refilled
            with CommDebugMode() as comm:
                out = plan.run(state)
            assert comm.get_total_counts() == 1, comm.get_total_counts()  # o_proj and down_proj share one
            assert plan.ready and plan.arena is arena
            for key, w in want.items():
                g = out[key]
                assert g is got[key] or g.to_local().data_ptr() == got[key].to_local().data_ptr(), key
                if key == "model.norm.weight":
                    assert not isinstance(g, DTensor) and torch.equal(kit.as_bytes(g), kit.as_bytes(w))
                    continue
                assert isinstance(g, DTensor) and tuple(g.shape) == tuple(w.shape) and g.dtype == w.dtype, key
                assert torch.equal(kit.as_bytes(g.to_local()), kit.local_bytes(w, g)), (step, key)
                assert torch.equal(kit.as_bytes(g.full_tensor()), kit.as_bytes(w)), (step, key)
        assert list(got["model.layers.0.mlp.gate_proj.weight_scale"].placements) == [Shard(0)]
        assert list(got["model.layers.0.mlp.down_proj.weight_shift"].placements) == [Replicate()]
        assert tuple(got["model.layers.0.mlp.down_proj.weight_scale"].shape) == (40, 1)
        # NaN in a kept, sharded tensor: refused naming it, on every rank holding it
        bad = dict(state)
        emb = fulls["model.embed_tokens.weight"].clone()
        emb[1, 0] = float("nan")  # rank 0's rows
        bad["model.embed_tokens.weight"] = distribute_tensor(emb, mesh, [Shard(0)], src_data_rank=None)
        if rank == 0:
            with pytest.raises(cc.ConversionInputError, match="model.embed_tokens.weight"):
                plan.run(bad)
        else:
            plan.run(bad)
    elif name == "replicated_companion_rows_refused":
        src = distribute_tensor(torch.randn(30, 20, generator=gen), mesh, [Shard(0)], src_data_rank=None)
        with pytest.raises(cc.ConversionInputError, match="'weight_max' needs every block's statistic"):
            _with_tensor_max().convert(src)
    elif name == "replicated_companion_cols":
        variant = _with_tensor_max()
        full = torch.randn(30, 21, generator=gen)
        full[29, 20] = 1000.0  # rank 1's column
        src = distribute_tensor(full, mesh, [Shard(1)], src_data_rank=None)
        with CommDebugMode() as comm:
            got = variant.convert(src)
        assert comm.get_total_counts() == 1
        want = variant.convert(full)
        _check_same(got[:3], want[:3], [Shard(1)], [Replicate()])
        assert list(got[3].placements) == [Replicate()] and got[3].to_local().item() == 1000.0
    else:
        raise AssertionError(f"unknown extra case {name}")


def _body(rank: int, world: int, results: kit.WorldResults) -> None:
    mesh = init_device_mesh("cpu", (world,))
    for case in CASES:
        kit.record(results, case.name, _run_case, case, mesh)
    for name in EXTRA:
        kit.record(results, name, _run_extra, name, mesh, rank)


@pytest.fixture(scope="module")
def world() -> list[kit.WorldResults]:
    if NAME not in cc.load_registry(reload=True).names():
        pytest.fail("toy_two_scales is not registered: pip install -e examples/toy_two_scales")
    return kit.run_gloo_world(_body, WORLD, deadline_s=DEADLINE_S)


@pytest.mark.parametrize("name", [c.name for c in CASES] + EXTRA)
def test_two_processes(world: list[kit.WorldResults], name: str) -> None:
    failures = kit.world_failures(world, name)
    assert not failures, failures
