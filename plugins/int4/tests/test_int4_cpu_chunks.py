"""The chunked CPU path (``torch_path.quantize``) writes the bytes of the whole-tensor definition
(``torch_path.reference_quantize``): many chunks and threads, ties on every rounding step, strided
and 3-D sources, fp16/fp32 sources, and the same refusals before any write."""

from __future__ import annotations

import pytest
import torch
from conversion_core_int4 import FORMATS, torch_path

import conversion_core as cc

NAMES = ["int4_w4a16_g128", "int4_w4a16_asym_g128", "int4_w4a16_g32", "int4_w4a16_asym_g32"]


def _run(fn, src: torch.Tensor, name: str) -> list[torch.Tensor]:
    fmt = FORMATS[name]
    buffers = [b.fill_(0) for b in cc.load_registry().get(name).allocate(src.shape)]
    packed, scale, shape, *rest = buffers
    fn(src, packed, scale, shape, rest[0] if rest else None, fmt.group, name)
    return buffers


def _ties(shape: tuple[int, ...], group: int, seed: int) -> torch.Tensor:
    """Groups whose scale is exactly 1 (symmetric amax 7.5; asymmetric range [-8, 7] or [-4, 11]),
    filled with multiples of 2^-6: every half-integer tie of both roundings, and of ``bf16(v + zp)``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-8 * 64, 11 * 64, shape, generator=g).float() / 64
    x = x.clamp(-8, 7).unflatten(-1, (-1, group))
    x[..., 0] = 7.5
    x[..., 1] = -7.5
    x[..., 1::3, :, 0], x[..., 1::3, :, 1] = -8.0, 7.0  # asymmetric: s = 1, zp = 0
    x[..., 2::3, :, 0], x[..., 2::3, :, 1] = -4.0, 11.0  # asymmetric: s = 1, zp = -4
    return x.flatten(-2)


def _sources(shape: tuple[int, ...], group: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp(torch.randn(*shape[:-1], 1, generator=g) * 3)
    x[..., 0, :] = 0  # zero groups
    x[..., 1, :group] = 1e-40  # subnormal: the scale underflows to 0 -> 2^-7
    x[..., 2, :] = x[..., 2, :].abs()  # only positive (asymmetric min clamps to 0)
    x[..., 3, :] = -x[..., 3, :].abs()
    return x


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch_path, "CHUNK_ELEMENTS", 3 * 256)  # several chunks of a few rows, on 2 threads


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(37, 256), (3, 13, 128), (1, 512)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_chunked_equals_reference(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    group = FORMATS[name].group
    if shape[-2] < 4:
        shape = (4, shape[-1])
    for src in (_sources(shape, group, 1), _ties(shape, group, 2)):
        src = src.to(dtype)
        for got, want in zip(
            _run(torch_path.quantize, src, name), _run(torch_path.reference_quantize, src, name), strict=True
        ):
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), f"{name} {shape} {dtype}"


@pytest.mark.parametrize("name", NAMES)
def test_strided_and_unmergeable_stacks(name: str) -> None:
    group = FORMATS[name].group
    sources = [
        _sources((40, 256), group, 3).to(torch.bfloat16).t().contiguous().t(),  # strides (1, 40)
        _sources((3, 13, 256), group, 4).to(torch.bfloat16).transpose(0, 1).contiguous().transpose(0, 1),
        _sources((3, 13, 512), group, 5).to(torch.bfloat16)[:, :, ::2],  # K stride 2
    ]
    for src in sources:
        got, want = _run(torch_path.quantize, src, name), _run(torch_path.reference_quantize, src, name)
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), f"{name} {tuple(src.shape)}"


@pytest.mark.parametrize("name", ["int4_w4a16_g128", "int4_w4a16_asym_g32"])
@pytest.mark.parametrize(
    ("dtype", "bad"),
    [
        (torch.bfloat16, float("nan")),
        (torch.bfloat16, float("-nan")),
        (torch.bfloat16, float("inf")),
        (torch.bfloat16, float("-inf")),
        (torch.float32, 3.4e38),  # finite, rounds to Inf in bf16
        (torch.float32, float("-inf")),
    ],
)
def test_refusals_match_reference(name: str, dtype: torch.dtype, bad: float) -> None:
    src = _sources((40, 256), FORMATS[name].group, 6).to(dtype)
    src[33, 200] = bad
    messages = []
    for fn in (torch_path.quantize, torch_path.reference_quantize):
        with pytest.raises(cc.ConversionInputError) as info:
            _run(fn, src, name)
        messages.append(str(info.value))
    assert messages[0] == messages[1]
    buffers = [b.fill_(0) for b in cc.load_registry().get(name).allocate(src.shape)]
    packed, scale, shape, *rest = buffers
    with pytest.raises(cc.ConversionInputError):
        torch_path.quantize(src, packed, scale, shape, rest[0] if rest else None, FORMATS[name].group, name)
    assert all(not b.any() for b in buffers), "a refused source wrote bytes"
