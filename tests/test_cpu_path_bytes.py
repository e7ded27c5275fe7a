"""The chunked CPU torch path writes exactly the bytes of the reference formulation it replaced.

``reference_quantize_blocks`` / ``reference_quantize_rows`` are the original whole-tensor
formulations, kept verbatim as the definition of the bytes; every case here compares ``q`` bytes
and scales bit for bit. Small ``CHUNK_ELEMENTS`` force many chunks (grouped bands, bands split by
columns, ragged edges) drained by several threads.
"""

from __future__ import annotations

import pytest
import torch
from conversion_core_cutlass_fp8 import torch_path as rows_path
from conversion_core_deepgemm_fp8 import torch_path as blocks_path

import conversion_core as cc

BLOCKS = "fp8_128x128"
ROWS = "cutlass_fp8_e4m3_per_channel"
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.fixture(autouse=True)
def two_threads():
    keep = torch.get_num_threads()
    torch.set_num_threads(2)  # the pool runs one worker per intra-op thread
    yield
    torch.set_num_threads(keep)


@pytest.fixture(params=[None, 1 << 14, 3 * 128 * 128], ids=["chunk-default", "chunk-16k", "chunk-48k"])
def chunk(request, monkeypatch):
    if request.param is not None:
        monkeypatch.setattr(blocks_path, "CHUNK_ELEMENTS", request.param)
        monkeypatch.setattr(rows_path, "CHUNK_ELEMENTS", request.param)
    return request.param


def reference(name: str, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    conversion = cc.load_registry().get(name)
    out, scale = conversion.allocate(src.shape)
    assert scale is not None
    if name == BLOCKS:
        blocks_path.reference_quantize_blocks(src, out, scale, (128, 128), name)
    else:
        rows_path.reference_quantize_rows(src, out, scale, name)
    return out, scale


def fast(name: str, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    conversion = cc.load_registry().get(name)
    out, scale = conversion.allocate(src.shape)
    conversion.fn(src, out, scale)  # the checked registry callable: the core's checks, then the torch path
    assert scale is not None
    return out, scale


def assert_same_bytes(name: str, src: torch.Tensor) -> None:
    want_q, want_s = reference(name, src)
    got_q, got_s = fast(name, src)
    assert torch.equal(got_q.view(torch.uint8), want_q.view(torch.uint8)), f"{name}: q bytes differ"
    assert torch.equal(got_s.view(torch.int32), want_s.view(torch.int32)), f"{name}: scale bits differ"


def varied(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Gaussian rows and columns spread over ~6 decades, so blocks and rows get distinct scales."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x *= torch.logspace(-3, 3, shape[-1]).roll(shape[-1] // 3)
    x *= torch.logspace(-2, 1, shape[-2]).unsqueeze(-1)
    return x.to(dtype)


SHAPES = [(256, 512), (300, 200), (130, 1000), (1, 7), (4, 256, 384), (3, 130, 257)]


@pytest.mark.parametrize("name", [BLOCKS, ROWS])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_contiguous_sources(name, dtype, shape, chunk):
    assert_same_bytes(name, varied(shape, dtype))


@pytest.mark.parametrize("name", [BLOCKS, ROWS])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_sources(name, dtype, chunk):
    base2 = varied((520, 300), dtype, seed=1)
    base3 = varied((3, 260, 140), dtype, seed=2)
    views = {
        "transposed": base2.t(),
        "column-slice": base2[:, 7:290],
        "strided-rows": base2[::2],
        "stepped-columns": base2[:, ::3],
        "experts-transposed": base3.transpose(1, 2),
        "experts-sliced": base3[:, 2:258, :],
        "expert-subset": base3[::2],
    }
    for label, src in views.items():
        assert not src.is_contiguous(), label
        assert_same_bytes(name, src)


@pytest.mark.parametrize("name", [BLOCKS, ROWS])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_blocks_huge_and_tiny_values(name, dtype, chunk):
    x = varied((384, 400), torch.float32, seed=3)
    x[:128, :128] = 0.0  # an all-zero block (and rows that are zero on that stretch)
    x[200] = 0.0  # an all-zero row
    x[130:140, 300:310] = -0.0
    big = torch.finfo(dtype).max
    x[256, 5] = big  # the largest finite value of the source dtype
    x[300, 390] = -big
    x[140:150, 200:260] = 1e-30 if dtype != torch.float16 else 6e-8  # tiny values, some blocks below MIN_AMAX
    assert_same_bytes(name, x.to(dtype))


def test_known_bytes_of_one_block():
    """Independent expectation: amax 896 gives scale exactly 2, and x / 2 is exactly representable."""
    src = torch.zeros(2, 3, dtype=torch.bfloat16)
    src[0] = torch.tensor([896.0, 3.0, -1.0])
    src[1] = torch.tensor([-896.0, 0.25, 0.0])
    q, scale = fast(BLOCKS, src)
    assert scale.tolist() == [[2.0]]
    assert q.float().tolist() == [[448.0, 1.5, -0.5], [-448.0, 0.125, 0.0]]
    q, scale = fast(ROWS, src)
    assert scale.tolist() == [2.0, 2.0]
    assert q.float().tolist() == [[448.0, 1.5, -0.5], [-448.0, 0.125, 0.0]]
    q, scale = fast(BLOCKS, torch.zeros(3, 5))  # all zero: scale max(0, 1e-12) / 448, q zero
    assert scale.item() == torch.tensor(1e-12 / 448.0, dtype=torch.float32).item()
    assert not q.view(torch.uint8).any()


@pytest.mark.parametrize("name", [BLOCKS, ROWS])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_raises_and_writes_nothing(name, dtype, bad, chunk):
    conversion = cc.load_registry().get(name)
    src = varied((3, 300, 260), dtype, seed=4)
    src[2, 299, 259] = bad  # the very last element: in the last ragged chunk of the last expert
    out, scale = conversion.allocate(src.shape)
    assert scale is not None
    out.view(torch.uint8).fill_(0x5A)
    scale.fill_(-7.0)
    with pytest.raises(cc.ConversionCoreError, match=r"\(3, 300, 260\).*NaN or Inf") as info:
        conversion.fn(src, out, scale)
    assert isinstance(info.value, ValueError)
    assert bool((out.view(torch.uint8) == 0x5A).all()), "out was written before the refusal"
    assert bool((scale == -7.0).all()), "scale_out was written before the refusal"


@pytest.mark.parametrize("name", [BLOCKS, ROWS])
def test_scale_out_may_be_a_slice_of_a_bigger_buffer(name, chunk):
    conversion = cc.load_registry().get(name)
    src = varied((2, 256, 300), torch.bfloat16, seed=5)
    want_q, want_s = reference(name, src)
    n = want_s.numel()
    arena = torch.full((3 * n,), -1.0)
    scale_out = arena[n : 2 * n].view(want_s.shape)  # contiguous, inside a fused-shard buffer
    out, _ = conversion.allocate(src.shape)
    conversion.fn(src, out, scale_out)
    assert torch.equal(out.view(torch.uint8), want_q.view(torch.uint8))
    assert torch.equal(scale_out, want_s)
    assert bool((arena[:n] == -1.0).all()) and bool((arena[2 * n :] == -1.0).all())


@pytest.mark.parametrize("name", [BLOCKS, ROWS])
def test_one_intra_op_thread_runs_inline(name, chunk):
    torch.set_num_threads(1)
    assert_same_bytes(name, varied((300, 520), torch.bfloat16, seed=6))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", [BLOCKS, ROWS])
def test_cuda_tensors_take_the_reference_and_match_cpu_bytes(name):
    src = varied((3, 300, 260), torch.bfloat16, seed=7)
    want_q, want_s = fast(name, src)
    cuda = src.cuda()
    q = torch.empty(src.shape, dtype=torch.float8_e4m3fn, device="cuda")
    s = torch.empty(want_s.shape, device="cuda")
    if name == BLOCKS:
        blocks_path.quantize_blocks(cuda, q, s, (128, 128), name)
    else:
        rows_path.quantize_rows(cuda, q, s, name)
    assert torch.equal(q.cpu().view(torch.uint8), want_q.view(torch.uint8))
    assert torch.equal(s.cpu(), want_s)
