"""The Triton kernel under TRITON_INTERPRET=1 gives the torch path's bytes (small shapes: the interpreter is slow)."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run with TRITON_INTERPRET=1", allow_module_level=True)

from conversion_core_nvfp4 import numerics, triton_kernels  # noqa: E402


def _source(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-8, 4, shape, generator=g).float())
    flat = x.reshape(-1, shape[-1])
    flat[0, :16] = 0.0
    flat[-1, -1] = 500.0
    flat[0, 17] = -0.0
    return x.to(dtype)


@pytest.mark.parametrize(
    "shape, dtype, view",
    [
        ((8, 128), torch.bfloat16, None),
        ((9, 48), torch.bfloat16, None),  # rows and K not multiples of the tile
        ((3, 5, 32), torch.float16, None),  # stacked experts
        ((16, 160), torch.float32, "t"),  # a transposed view
    ],
)
def test_kernel_equals_torch_path(shape: tuple[int, ...], dtype: torch.dtype, view: str | None) -> None:
    src = _source(shape, dtype, seed=sum(shape))
    if view == "t":
        src = src.t().contiguous().t()
    amax = numerics.tensor_amax(src)
    k = shape[-1]
    want_p = torch.empty(*shape[:-1], k // 2, dtype=torch.uint8)
    want_s = torch.empty(*shape[:-1], k // 16, dtype=torch.float8_e4m3fn)
    gs = numerics.quantize_with_amax(src, amax, want_p, want_s, "nvfp4")
    got_p, got_s = torch.full_like(want_p, 0xFF), torch.empty_like(want_s)
    got_gs = triton_kernels.quantize_with_amax(src, amax, got_p, got_s, "nvfp4")
    assert torch.equal(got_p, want_p)
    assert torch.equal(got_s.view(torch.uint8), want_s.view(torch.uint8))
    assert torch.equal(got_gs, gs)


def test_launch_flags_nan() -> None:
    src = _source((4, 32), torch.bfloat16, seed=1)
    src[2, 3] = float("nan")
    p = torch.empty(4, 16, dtype=torch.uint8)
    s = torch.empty(4, 2, dtype=torch.float8_e4m3fn)
    g = torch.empty(1)
    flag = torch.zeros(1, dtype=torch.int32)
    triton_kernels.launch(src, numerics.tensor_amax(src), p, s, g, flag, multiplier=False)
    assert int(flag.item()) > 0
