"""The Triton kernels, run by Triton's CPU interpreter, write the torch path's exact bytes.

``TRITON_INTERPRET`` must be set before the kernels are decorated, so a normal pytest run
re-runs this file in a child process with ``TRITON_INTERPRET=1`` and
``CONVERSION_CORE_BACKEND=triton``; the child (or any run started with those variables) runs
the real tests below. What the interpreter cannot show is the GPU's own division and cast
instructions: tests/gpu compares GPU bytes with CPU bytes for that.
"""

from __future__ import annotations

import pytest
import torch

from conversion_core.testing import rerun_under_triton_interpreter, under_triton_interpreter

pytest.importorskip("triton")

INTERPRETING = under_triton_interpreter()

BLOCK = "fp8_128x128"
CHANNEL = "cutlass_fp8_e4m3_per_channel"


if not INTERPRETING:

    def test_kernels_match_torch_path_under_interpreter() -> None:
        rerun_under_triton_interpreter(__file__, timeout_s=600)

else:
    import conversion_core as cc
    from conversion_core import testing as kit
    from conversion_core.backend import use_triton
    from conversion_core.errors import ConversionInputError

    def _convert(name: str, src: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
        out, scale = kit.convert_on_backend(cc.load_registry().get(name), src, backend)
        return out.view(torch.uint8), scale

    def _assert_same_bytes(name: str, src: torch.Tensor) -> None:
        q_triton, s_triton = _convert(name, src, "triton")
        kit.assert_same_bytes((q_triton, s_triton), _convert(name, src, "torch"), f"{name} {tuple(src.shape)}")
        assert not torch.isnan(s_triton).any()

    def _weights(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
        """Rows and blocks of very different size (every e4m3 regime, subnormals too), a signed zero."""
        return kit.spread_weights(shape, dtype, seed, row_exponents=(-6.0, 6.0))

    def test_interpreter_really_runs_the_triton_kernels() -> None:
        from conversion_core_cutlass_fp8 import triton_kernels as channel_kernels
        from conversion_core_deepgemm_fp8 import triton_kernels as block_kernels

        assert use_triton(torch.zeros(1))
        for kernel in (block_kernels._quantize_tile_kernel, channel_kernels._quantize_rows_kernel):
            assert type(kernel).__name__ == "InterpretedFunction"

    @pytest.mark.parametrize("name", [BLOCK, CHANNEL])
    @pytest.mark.parametrize(
        "shape",
        [(200, 300), (2, 130, 257), (1, 1), (128, 128), (129, 127)],
        ids=lambda s: "x".join(map(str, s)),
    )
    def test_bytes_match(name: str, shape: tuple[int, ...]) -> None:
        _assert_same_bytes(name, _weights(shape, torch.bfloat16, seed=sum(shape)))

    @pytest.mark.parametrize("name", [BLOCK, CHANNEL])
    @pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
    def test_source_dtypes(name: str, dtype: torch.dtype) -> None:
        _assert_same_bytes(name, _weights((2, 130, 257), dtype, seed=11))

    @pytest.mark.parametrize("name", [BLOCK, CHANNEL])
    def test_long_rows_take_the_chunked_path(name: str) -> None:
        # K past the single-load limit: the per-channel kernel walks each row in chunks, twice
        _assert_same_bytes(name, _weights((6, 9000), torch.bfloat16, seed=7))

    @pytest.mark.parametrize("name", [BLOCK, CHANNEL])
    @pytest.mark.parametrize("view", kit.NON_CONTIGUOUS_VIEWS)
    def test_non_contiguous_sources(name: str, view: str) -> None:
        src = kit.non_contiguous_view(view, _weights)
        _assert_same_bytes(name, src)

    @pytest.mark.parametrize("name", [BLOCK, CHANNEL])
    def test_round_half_to_even_and_extremes(name: str) -> None:
        # amax 448 makes the scale exactly 1, so x itself is the e4m3 input: 17 and 19 sit halfway
        # between e4m3 neighbours (16, 18, 20) and go to the even mantissa (16, 20); 3*2**-10 and
        # 2**-10 sit halfway between subnormals (2**-8 and 0 win); 464 would round past 448.
        row = kit.e4m3_rounding_row()
        src = torch.stack([row, row * 2.0**-20, row * 2.0**60]).to(torch.float32)
        _assert_same_bytes(name, src)
        q, _ = _convert(name, src, "triton")
        expected = torch.tensor([448.0, 16.0, 20.0, -16.0, 2.0**-8, 0.0, -0.0, 0.0, -0.0, 240.0, 224.0])
        expected_bytes = expected.to(torch.float8_e4m3fn).view(torch.uint8)
        if name == CHANNEL:  # every row has its own scale, so every row gives the same bytes
            for r in range(3):
                assert torch.equal(q[r], expected_bytes), (r, q[r], expected_bytes)
        else:  # one block: the 2**60 row sets amax, so its scale is 2**60 and row 2 carries the bytes
            assert torch.equal(q[2], expected_bytes), (q[2], expected_bytes)
        huge = torch.full((4, 5), 3.0e38)
        huge[1, 2] = -3.4028234663852886e38
        _assert_same_bytes(name, huge)

    @pytest.mark.parametrize("name", [BLOCK, CHANNEL])
    @pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
    @pytest.mark.parametrize("shape", [(150, 260), (3, 40, 130)], ids=["2d", "3d"])
    def test_non_finite_refused(name: str, bad: float, shape: tuple[int, ...], monkeypatch) -> None:
        monkeypatch.setenv("CONVERSION_CORE_BACKEND", "triton")
        src = _weights(shape, torch.bfloat16, seed=5)
        src.view(-1)[src.numel() - 7] = bad  # in the last, partial block / row
        conversion = cc.load_registry().get(name)
        out, scale = conversion.allocate(src.shape)
        with pytest.raises(ConversionInputError, match=r"NaN or Inf") as info:
            conversion.fn(src, out, scale)
        assert str(tuple(shape)) in str(info.value)
