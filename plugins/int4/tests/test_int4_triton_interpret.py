"""The Triton kernel under TRITON_INTERPRET=1 gives the torch path's bytes (small shapes: the interpreter is slow).

On a GPU, ``benchmarks/gpu_int4.py`` checks the compiled kernel against the CPU bytes.
"""

from __future__ import annotations

import os

import pytest
import torch

import conversion_core as cc

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")


def source(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 0.03
    x[..., 0, :] = 0
    x[..., -1, 7] = -6.0
    if shape[-2] > 2:
        x[..., 1, :] = x[..., 1, :].abs()
        x[..., 2, :64] = 1e-40
    return x.to(dtype)


def run(conversion: cc.Conversion, src: torch.Tensor, backend: str, monkeypatch: pytest.MonkeyPatch) -> tuple:
    monkeypatch.setenv("CONVERSION_CORE_BACKEND", backend)
    return conversion.convert(src)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    view = (lambda t: t.view(torch.int16)) if a.dtype == torch.bfloat16 else (lambda t: t)
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(view(a), view(b))


@pytest.mark.parametrize("name", ["int4_w4a16_g128", "int4_w4a16_g32", "int4_w4a16_asym_g128", "int4_w4a16_asym_g32"])
@pytest.mark.parametrize("shape", [(19, 256), (1, 128), (2, 13, 128), (3, 9, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_bytes_equal_torch_path(
    name: str, shape: tuple[int, ...], dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    conversion = cc.load_registry().get(name)
    if shape[-1] % conversion.compile_metadata["group_size"]:
        pytest.skip("K not a multiple of the group: refused by both paths")
    src = source(shape, dtype, hash((name, shape)) % 997)
    want = run(conversion, src, "torch", monkeypatch)
    got = run(conversion, src, "triton", monkeypatch)
    for w, g, out in zip(want, got, conversion.outputs, strict=True):
        assert same(w, g), f"{name} {shape} {dtype}: {out.name} differs"


def test_triton_strided_source(monkeypatch: pytest.MonkeyPatch) -> None:
    conversion = cc.load_registry().get("int4_w4a16_asym_g32")
    src = source((64, 24), torch.bfloat16, 1).t()  # (24, 64), column-major
    want = run(conversion, src.contiguous(), "torch", monkeypatch)
    got = run(conversion, src, "triton", monkeypatch)
    assert all(same(w, g) for w, g in zip(want, got, strict=True))


@pytest.mark.parametrize("name", ["int4_w4a16_g128", "int4_w4a16_asym_g32"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_triton_flags_non_finite(name: str, bad: float, monkeypatch: pytest.MonkeyPatch) -> None:
    conversion = cc.load_registry().get(name)
    src = source((9, 128), torch.float32, 2)
    src[4, 77] = bad
    monkeypatch.setenv("CONVERSION_CORE_BACKEND", "triton")
    with pytest.raises(cc.ConversionInputError, match=r"\(9, 128\)"):
        conversion.convert(src)


def test_launch_sets_flag_without_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    conversion = cc.load_registry().get("int4_w4a16_g128")
    src = source((8, 128), torch.bfloat16, 3)
    buffers = conversion.allocate(src.shape)
    flag = torch.zeros(1, dtype=torch.int32)
    conversion.launch(src, *buffers, flag)
    assert int(flag) == 0
    monkeypatch.setenv("CONVERSION_CORE_BACKEND", "torch")
    for got, want in zip(buffers, conversion.convert(src), strict=True):
        assert same(got, want)
    src[0, 0] = float("nan")
    conversion.launch(src, *buffers, flag)
    assert int(flag) == 1
