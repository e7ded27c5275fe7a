"""The UE8M0 variant of the Triton tile kernel, run by Triton's CPU interpreter, writes the torch path's bytes.

``TRITON_INTERPRET`` must be set before the kernels are decorated, so a normal pytest run re-runs
this file in a child process with ``TRITON_INTERPRET=1`` and ``CONVERSION_CORE_BACKEND=triton``
(as tests/test_triton_interpret.py does for the other kernels). The interpreter computes with
numpy, so it proves the kernel's logic (floor, power-of-two rounding, saturation, masks, experts)
but not the GPU's division and cast instructions: tests/gpu compares GPU bytes with CPU bytes.
"""

from __future__ import annotations

import pytest
import torch

from conversion_core.testing import rerun_under_triton_interpreter, under_triton_interpreter

pytest.importorskip("triton")

INTERPRETING = under_triton_interpreter()

NAME = "fp8_128x128_ue8m0"


if not INTERPRETING:

    def test_kernel_matches_torch_path_under_interpreter() -> None:
        rerun_under_triton_interpreter(__file__, timeout_s=600)

else:
    import conversion_core as cc
    from conversion_core import testing as kit
    from conversion_core.backend import use_triton
    from conversion_core.errors import ConversionInputError

    def _convert(src: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
        out, scale = kit.convert_on_backend(cc.load_registry().get(NAME), src, backend)
        return out.view(torch.uint8), scale

    def _assert_same_bytes(src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q_triton, s_triton = _convert(src, "triton")
        kit.assert_same_bytes((q_triton, s_triton), _convert(src, "torch"), f"{tuple(src.shape)}")
        assert bool(((s_triton.view(torch.int32) & 0x7FFFFF) == 0).all()), "a scale is not a power of two"
        return q_triton, s_triton

    def _weights(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
        """Rows and blocks of very different size, some below the 1e-4 floor, and a signed zero."""
        return kit.spread_weights(shape, dtype, seed)

    def test_interpreter_really_runs_the_triton_kernel() -> None:
        from conversion_core_deepgemm_fp8 import triton_kernels

        assert use_triton(torch.zeros(1))
        assert type(triton_kernels._quantize_tile_kernel).__name__ == "InterpretedFunction"

    @pytest.mark.parametrize(
        "shape",
        [(200, 300), (2, 130, 257), (1, 1), (128, 128), (129, 127), (3, 256, 384)],
        ids=lambda s: "x".join(map(str, s)),
    )
    def test_bytes_match(shape: tuple[int, ...]) -> None:
        _assert_same_bytes(_weights(shape, torch.bfloat16, seed=sum(shape)))

    @pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
    def test_source_dtypes(dtype: torch.dtype) -> None:
        _assert_same_bytes(_weights((2, 130, 257), dtype, seed=11))

    @pytest.mark.parametrize("view", kit.NON_CONTIGUOUS_VIEWS)
    def test_non_contiguous_sources(view: str) -> None:
        src = kit.non_contiguous_view(view, _weights)
        _assert_same_bytes(src)

    def test_zero_block_floor_and_448_boundary() -> None:
        """One block per case: all zeros (scale 2^-22), amax below the 1e-4 floor, amax exactly
        448 * 2^k (scale 2^k, q 448), one float32 step above (scale 2^(k+1)) and below it."""
        top = torch.tensor([448.0 * 2.0**k for k in (-20, 0, 9)])
        bits = top.view(torch.int32)
        amaxes = torch.cat([top, (bits + 1).view(torch.float32), (bits - 1).view(torch.float32)])
        src = torch.zeros(128 * 11, 130)
        src[128 : 2 * 128, :] = 3.0e-7
        for i, amax in enumerate(amaxes.tolist()):
            rows = slice((i + 2) * 128, (i + 3) * 128)
            src[rows, :] = amax * 0.37
            src[rows.start + 5, 17] = -amax
            src[rows.start + 9, 100] = amax
        src[-1, -1] = 1.0  # the last (ragged) column block
        q, scale = _assert_same_bytes(src)
        assert scale[0, 0].item() == 2.0**-22 and scale[1, 0].item() == 2.0**-22
        expected = [2.0**-20, 1.0, 2.0**9, 2.0**-19, 2.0, 2.0**10, 2.0**-20, 1.0, 2.0**9]
        assert scale[2:, 0].tolist() == expected
        q = q.view(torch.float8_e4m3fn).float()
        assert q[2 * 128 + 5, 17].item() == -448.0 and q[5 * 128 + 5, 17].item() == -224.0
        assert q[8 * 128 + 9, 100].item() == 448.0

    def test_round_half_to_even_and_saturation() -> None:
        row = kit.e4m3_rounding_row()
        src = torch.stack([row, row * 2.0**-20, row * 2.0**60])
        q, _ = _assert_same_bytes(src)
        expected = torch.tensor([448.0, 16.0, 20.0, -16.0, 2.0**-8, 0.0, -0.0, 0.0, -0.0, 240.0, 224.0])
        assert torch.equal(q[2], expected.to(torch.float8_e4m3fn).view(torch.uint8))
        huge = torch.full((4, 5), 3.0e38)
        huge[1, 2] = -3.4028234663852886e38
        huge[0, 0] = 248.0 * 2.0**120
        q, scale = _assert_same_bytes(huge)
        assert scale.item() == 2.0**120
        q = q.view(torch.float8_e4m3fn).float()
        assert q[1, 2].item() == -240.0 and q[0, 0].item() == 240.0  # 256 * 2^120 would be Inf

    def test_launch_sets_the_flag_and_writes_the_same_bytes() -> None:
        conversion = cc.load_registry().get(NAME)
        assert conversion.launch is not None
        src = _weights((2, 130, 257), torch.bfloat16, seed=4)
        q_torch, s_torch = _convert(src, "torch")
        out, scale = conversion.allocate(src.shape)
        assert scale is not None
        flag = torch.zeros(1, dtype=torch.int32)
        conversion.launch(src, out, scale, flag)
        assert flag.item() == 0
        assert torch.equal(out.view(torch.uint8), q_torch) and torch.equal(scale, s_torch)
        src.view(-1)[-3] = float("inf")
        conversion.launch(src, out, scale, flag)
        assert flag.item() == 1

    @pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
    @pytest.mark.parametrize("shape", [(150, 260), (3, 40, 130)], ids=["2d", "3d"])
    def test_non_finite_refused(bad: float, shape: tuple[int, ...], monkeypatch) -> None:
        monkeypatch.setenv("CONVERSION_CORE_BACKEND", "triton")
        src = _weights(shape, torch.bfloat16, seed=5)
        src.view(-1)[src.numel() - 7] = bad  # in the last, partial block
        conversion = cc.load_registry().get(NAME)
        out, scale = conversion.allocate(src.shape)
        with pytest.raises(ConversionInputError, match=r"NaN or Inf") as info:
            conversion.fn(src, out, scale)
        assert str(tuple(shape)) in str(info.value)
