"""DTensor sources on gloo (CPU), 2 processes: MX bytes equal the unsharded conversion exactly.

Shards that cut 32-element groups (K sharded at 48 of 96, experts' K at 80 of 160) must reduce the
group amax across ranks; an outlier only one rank sees must set the scale byte of its group on
both. Expectation: the unsharded conversion of the full tensor, cut by DTensor's own slicing (compared
rank by rank: gloo cannot gather float8).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import traceback
import zlib
from dataclasses import dataclass
from datetime import timedelta

import pytest
import torch

import conversion_core as cc

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import torch.multiprocessing as mp  # noqa: E402
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor, init_device_mesh  # noqa: E402
from torch.distributed.tensor.debug import CommDebugMode  # noqa: E402

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


def _placement(p: str) -> list:
    return [Replicate() if p == "R" else Shard(int(p[1:]))]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _run_case(name: str, case: Case, mesh) -> None:
    conv = cc.load_registry().get(name)
    gen = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))
    full = (torch.randn(case.shape, generator=gen) * 0.02).to(torch.bfloat16)
    if case.outlier is not None:
        full[case.outlier] = 30.0
    placements = _placement(case.placement)
    src = distribute_tensor(full, mesh, placements, src_data_rank=None)
    with CommDebugMode() as comm:
        got = conv.convert(src)
    assert comm.get_total_counts() == case.all_reduces, f"{comm.get_total_counts()} collectives"
    want = conv.convert(full)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert isinstance(g, DTensor) and tuple(g.shape) == tuple(w.shape) and g.dtype == w.dtype, i
        assert list(g.placements) == (placements if i == 0 else _placement(case.scale_placement)), g.placements
        local = distribute_tensor(w, g.device_mesh, g.placements, src_data_rank=None).to_local()
        assert torch.equal(_bits(g.to_local()), _bits(local)), f"output {i}: this rank's bytes differ"
    if case.outlier is not None:  # independent: 30.0 = 1.875 * 2**4 rounds up to 2**5
        group = (*case.outlier[:-1], case.outlier[-1] // 32)
        assert int(want[1][group]) == 127 + 5 - (8 if name == "mxfp8" else 2)  # got[1] equals it (checked above)


def _worker(rank: int, world: int, store_path: str, result_dir: str) -> None:
    torch.set_num_threads(1)
    cc.load_registry()
    dist.init_process_group(
        "gloo", init_method=f"file://{store_path}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    results: dict[str, str] = {}
    try:
        mesh = init_device_mesh("cpu", (world,))
        for name in NAMES:
            for case in CASES:
                try:
                    _run_case(name, case, mesh)
                    results[f"{name}-{case.name}"] = "ok"
                except Exception:
                    results[f"{name}-{case.name}"] = traceback.format_exc()
    finally:
        with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def world() -> list[dict[str, str]]:
    assert set(NAMES) <= set(cc.load_registry(reload=True).names()), "is conversion-core-mx installed?"
    with tempfile.TemporaryDirectory() as tmp:
        context = mp.start_processes(
            _worker, args=(WORLD, os.path.join(tmp, "store"), tmp), nprocs=WORLD, start_method="fork", join=False
        )
        deadline = time.monotonic() + DEADLINE_S
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.kill()
                pytest.fail(f"the {WORLD}-process gloo world did not finish within {DEADLINE_S} s")
        out = []
        for rank in range(WORLD):
            with open(os.path.join(tmp, f"rank{rank}.json")) as f:
                out.append(json.load(f))
        return out


@pytest.mark.parametrize("case", [f"{n}-{c.name}" for n in NAMES for c in CASES])
def test_two_processes(world: list[dict[str, str]], case: str) -> None:
    failures = [f"rank {r}: {res.get(case, 'did not run')}" for r, res in enumerate(world) if res.get(case) != "ok"]
    assert not failures, "\n".join(failures)
