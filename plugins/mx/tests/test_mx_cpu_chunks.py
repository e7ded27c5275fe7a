"""The chunked CPU path (``torch_path.quantize``) writes the bytes of the whole-tensor formulation
(``torch_path.reference_quantize``): many chunks on 2 threads, fp16/fp32 sources, strided and 3-D
stacks, -0.0, subnormals, e2m1 ties, and groups at the saturating top scale (tensor clamp bounds)."""

from __future__ import annotations

import pytest
import torch
from conversion_core_mx import torch_path
from conversion_core_mx.numerics import MXFP4, MXFP8


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch_path, "CHUNK_ELEMENTS", 3 * 96)


def _source(shape: tuple[int, ...], seed: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp(torch.randn(*shape[:-1], 1, generator=g) * 4)
    x[..., 0, :32] = 0.0
    x[..., 0, 32:64] = -0.0
    x[..., 1, :32] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 4) * torch.tensor([1.0, -1.0]).repeat(
        16
    )
    x[..., 2, :32] = 1e-40  # subnormal (fp32) / zero (bf16) groups
    if dtype != torch.float16:
        x[..., 3, :32] = 3.3e38 * torch.linspace(-1, 1, 32)  # the saturating top scale: limit below qmax
    if dtype == torch.float16:
        x = x.clamp(-6e4, 6e4)  # finite in fp16
    return x.to(dtype)


def _run(fn, src: torch.Tensor, fmt) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.zeros(
        (*src.shape[:-1], src.shape[-1] // fmt.per_byte),
        dtype=torch.float8_e4m3fn if fmt.per_byte == 1 else torch.uint8,
    )
    s = torch.zeros((*src.shape[:-1], src.shape[-1] // 32), dtype=torch.uint8)
    fn(src, q, s, fmt)
    return q.view(torch.uint8), s


@pytest.mark.parametrize("fmt", [MXFP4, MXFP8], ids=["mxfp4", "mxfp8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("layout", ["plain", "3d", "transposed", "unmergeable"])
def test_chunked_equals_reference(fmt, dtype: torch.dtype, layout: str) -> None:
    if layout == "plain":
        src = _source((37, 96), 1, dtype)
    elif layout == "3d":
        src = _source((3, 11, 64), 2, dtype)
    elif layout == "transposed":
        src = _source((29, 64), 3, dtype).t().contiguous().t()
    else:
        src = _source((3, 11, 128), 4, dtype).transpose(0, 1).contiguous().transpose(0, 1)
    got, want = _run(torch_path.quantize, src, fmt), _run(torch_path.reference_quantize, src, fmt)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
