"""DTensor sources on gloo (CPU), 2 processes: MX bytes equal the unsharded conversion exactly.

Shards that cut 32-element groups (K sharded at 48 of 96, experts' K at 80 of 160) must reduce the
group amax across ranks; an outlier only one rank sees must set the scale byte of its group on
both. Expectation: the unsharded conversion of the full tensor, cut by DTensor's own slicing (compared
rank by rank: gloo cannot gather float8).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import pytest
import torch

import conversion_core as cc

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

# Imported before the world forks, so the children share them.
from torch.distributed.tensor import distribute_tensor, init_device_mesh  # noqa: E402
from torch.distributed.tensor.debug import CommDebugMode  # noqa: E402

from conversion_core import testing as kit  # noqa: E402

WORLD = 2
DEADLINE_S = 240


@dataclass(frozen=True)
class Case:
    name: str
    shape: tuple[int, ...]
    placement: str  # "S0", "S1", "S2", "R"
    scale_placement: str
    all_reduces: int
    outlier: tuple[int, ...] | None = None


CASES = [
    Case("rows_S0", (10, 64), "S0", "S0", 0),
    Case("cols_S1_whole_groups", (6, 128), "S1", "S1", 0),
    Case("cols_S1_cut_groups_outlier", (6, 96), "S1", "R", 1, outlier=(2, 40)),  # shards of 48: group 1 is cut
    Case("experts_S2_cut_groups", (2, 5, 160), "S2", "R", 1, outlier=(1, 4, 70)),  # 80 + 80: group 2 is cut
    Case("experts_S0", (3, 4, 64), "S0", "S0", 0),
    Case("replicated", (4, 64), "R", "R", 0),
]
NAMES = ["mxfp8", "mxfp4"]


def _run_case(name: str, case: Case, mesh) -> None:
    conv = cc.load_registry().get(name)
    gen = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))
    full = (torch.randn(case.shape, generator=gen) * 0.02).to(torch.bfloat16)
    if case.outlier is not None:
        full[case.outlier] = 30.0
    placements = kit.dtensor_placements(case.placement)
    src = distribute_tensor(full, mesh, placements, src_data_rank=None)
    with CommDebugMode() as comm:
        got = conv.convert(src)
    assert comm.get_total_counts() == case.all_reduces, f"{comm.get_total_counts()} collectives"
    want = conv.convert(full)
    kit.assert_sharded_outputs(got, want, [placements, kit.dtensor_placements(case.scale_placement)], case.name)
    if case.outlier is not None:  # independent: 30.0 = 1.875 * 2**4 rounds up to 2**5
        group = (*case.outlier[:-1], case.outlier[-1] // 32)
        assert int(want[1][group]) == 127 + 5 - (8 if name == "mxfp8" else 2)  # got[1] equals it (checked above)


def _body(rank: int, world: int, results: kit.WorldResults) -> None:
    mesh = init_device_mesh("cpu", (world,))
    for name in NAMES:
        for case in CASES:
            kit.record(results, f"{name}-{case.name}", _run_case, name, case, mesh)


@pytest.fixture(scope="module")
def world() -> list[kit.WorldResults]:
    assert set(NAMES) <= set(cc.load_registry(reload=True).names()), "is conversion-core-mx installed?"
    return kit.run_gloo_world(_body, WORLD, deadline_s=DEADLINE_S)


@pytest.mark.parametrize("case", [f"{n}-{c.name}" for n in NAMES for c in CASES])
def test_two_processes(world: list[kit.WorldResults], case: str) -> None:
    failures = kit.world_failures(world, case)
    assert not failures, failures
