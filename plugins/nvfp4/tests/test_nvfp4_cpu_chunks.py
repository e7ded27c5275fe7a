"""The chunked CPU path (``numerics.quantize_with_amax`` and ``tensor_amax``) writes the bytes of the
whole-tensor formulation (``reference_quantize_with_amax``, ``src.abs().amax()``): many chunks on 2
threads, fp16/fp32 sources, strided and 3-D stacks, -0.0, subnormals, zero groups, NaN/Inf refused."""

from __future__ import annotations

import pytest
import torch
from conversion_core_nvfp4 import numerics

import conversion_core as cc


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(numerics, "CHUNK_ELEMENTS", 3 * 48)


def _source(shape: tuple[int, ...], seed: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp(torch.randn(*shape[:-1], 1, generator=g) * 3)
    x[..., 0, :16] = 0.0
    x[..., 0, 16:32] = -0.0
    x[..., 1, :16] = 1e-30
    x[..., 2, :16] = -1e-40
    if dtype == torch.float16:
        x = x.clamp(-6e4, 6e4)  # finite in fp16
    return x.to(dtype)


def _run(src: torch.Tensor, reference: bool) -> tuple[torch.Tensor, ...]:
    packed = torch.zeros((*src.shape[:-1], src.shape[-1] // 2), dtype=torch.uint8)
    scales = torch.zeros((*src.shape[:-1], src.shape[-1] // 16), dtype=torch.float8_e4m3fn)
    if reference:
        amax = src.abs().amax().float().reshape(1)
        gs = numerics.reference_quantize_with_amax(src, amax, packed, scales, "nvfp4")
    else:
        amax = numerics.tensor_amax(src)
        gs = numerics.quantize_with_amax(src, amax, packed, scales, "nvfp4")
    return amax, gs, packed, scales.view(torch.uint8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("layout", ["plain", "3d", "transposed", "unmergeable"])
def test_chunked_equals_reference(dtype: torch.dtype, layout: str) -> None:
    if layout == "plain":
        src = _source((37, 48), 1, dtype)
    elif layout == "3d":
        src = _source((3, 11, 32), 2, dtype)
    elif layout == "transposed":
        src = _source((29, 64), 3, dtype).t().contiguous().t()
    else:
        src = _source((3, 11, 64), 4, dtype).transpose(0, 1).contiguous().transpose(0, 1)
    for got, want in zip(_run(src, False), _run(src, True), strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("bad", [float("nan"), float("-nan"), float("inf"), float("-inf")])
def test_non_finite_refused(bad: float) -> None:
    src = _source((37, 48), 5, torch.bfloat16)
    src[30, 40] = bad
    assert not bool(torch.isfinite(numerics.tensor_amax(src)).all())
    with pytest.raises(cc.ConversionInputError, match=r"\(37, 48\)"):
        numerics.quantize_with_amax(
            src,
            torch.ones(1),
            torch.zeros(37, 24, dtype=torch.uint8),
            torch.zeros(37, 3, dtype=torch.float8_e4m3fn),
            "nvfp4",
        )
