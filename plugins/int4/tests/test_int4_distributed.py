"""DTensor sources on gloo (CPU), 2 and 4 processes: shards that cut groups give the unsharded bytes.

Each world runs every case once and writes its outcome per rank; the tests read them. The
expectation is the unsharded conversion of the full tensor; the DTensor is cut by DTensor's own
slicing (``distribute_tensor(..., src_data_rank=None)``, no communication).
"""

from __future__ import annotations

import pytest
import torch

import conversion_core as cc

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

# Imported before the worlds fork, so the children share them.
from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh  # noqa: E402
from torch.distributed.tensor.debug import CommDebugMode  # noqa: E402

from conversion_core.testing import WorldResults, run_gloo_world  # noqa: E402

SYM = "int4_w4a16_g128"
#: (name, conversion, shape, sharded dim): every K chunk cuts a group, and falls on whole words.
CASES = [
    ("cols_g128", SYM, (24, 384), 1),  # chunks of 192 (2 ranks) and 96 (4 ranks)
    ("cols_g128_outlier", SYM, (9, 640), 1),
    ("cols_g32", "int4_w4a16_g32", (5, 96), 1),  # chunks of 48 and 24
    ("experts_cols", SYM, (3, 7, 384), 2),
    ("one_row", SYM, (1, 384), 1),
]


def _source(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 0.02
    x[..., 0, :] = 0
    x[..., -1, -3] = 3.0  # an outlier only the last rank sees
    return x.to(torch.bfloat16)


def _body(rank: int, world: int, results: WorldResults) -> None:
    mesh = init_device_mesh("cpu", (world,))
    registry = cc.load_registry()
    for i, (case, name, shape, dim) in enumerate(CASES):
        conversion = registry.get(name)
        full = _source(shape, i)
        want = conversion.convert(full)
        src = distribute_tensor(full, mesh, [Shard(dim)], src_data_rank=None)
        with CommDebugMode() as comm:
            got = conversion.convert(src)
        same = all(torch.equal(g.full_tensor(), w) for g, w in zip(got, want, strict=True))
        results[case] = {"same": same, "collectives": comm.get_total_counts()}
    for case, name in (("rows_refused", SYM), ("asym_refused", "int4_w4a16_asym_g128")):
        src = distribute_tensor(
            _source((16, 384), 9), mesh, [Shard(0 if case == "rows_refused" else 1)], src_data_rank=None
        )
        try:
            registry.get(name).convert(src)
            results[case] = "converted"
        except cc.ConversionCoreError as exc:
            results[case] = str(exc)
    bad = _source((8, 384), 11)
    bad[2, 383] = float("nan")  # on the last rank only
    try:
        registry.get(SYM).convert(distribute_tensor(bad, mesh, [Shard(1)], src_data_rank=None))
        results["nan"] = "converted"
    except cc.ConversionCoreError as exc:
        results["nan"] = str(exc)


@pytest.fixture(scope="module", params=[2, 4])
def outcomes(request: pytest.FixtureRequest) -> list[dict]:
    return run_gloo_world(_body, request.param, deadline_s=600)


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_sharded_bytes_equal_unsharded(outcomes: list[dict], case: str) -> None:
    for rank, res in enumerate(outcomes):
        assert res[case]["same"], f"rank {rank}: {case} differs from the unsharded conversion"
        assert res[case]["collectives"] == 1, f"rank {rank}: {case}: {res[case]['collectives']} collectives, expected 1"


def test_whole_group_shards_and_asymmetric_refused(outcomes: list[dict]) -> None:
    for res in outcomes:
        assert "weight_shape" in res["rows_refused"] and "full_tensor" in res["rows_refused"]
        assert "no sharded form" in res["asym_refused"]


def test_nan_on_one_rank_raises_on_every_rank(outcomes: list[dict]) -> None:
    for res in outcomes:
        assert "NaN or Inf" in res["nan"]
