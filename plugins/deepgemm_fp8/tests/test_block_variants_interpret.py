"""Every launch variant of the 128x128 tile kernel, run by Triton's CPU interpreter, writes the torch path's bytes.

The benchmark (benchmarks/gpu_grouped.py) times these :class:`BlockConfig` variants on a GPU and
the device defaults (``DEVICE_CONFIGS``) are picked from them, so each must be bit-identical to
the torch path for both formats: ``fp8_128x128`` (float32 scales) and ``fp8_128x128_ue8m0``
(power-of-two scales). ``TRITON_INTERPRET`` must be set before the kernels are decorated, so a
normal pytest run re-runs this file in a child process with ``TRITON_INTERPRET=1`` and
``CONVERSION_CORE_BACKEND=triton``. The interpreter computes with numpy (IEEE float32 products,
a true FMA), so it proves each variant's arithmetic and indexing; tests/gpu and the benchmark's
check section compare GPU bytes with CPU bytes.
"""

from __future__ import annotations

import pytest
import torch

from conversion_core.testing import rerun_under_triton_interpreter, under_triton_interpreter

pytest.importorskip("triton")

INTERPRETING = under_triton_interpreter()

BLOCK = "fp8_128x128"
UE8M0 = "fp8_128x128_ue8m0"

#: The new flags alone and together, non-persistent and persistent (the benchmark's sweep).
VARIANTS = [
    {"short_div": True},
    {"pow2_mul": True},
    {"tile_base": True},
    {"num_warps": 8, "short_div": True, "pow2_mul": True, "tile_base": True},
    {"num_warps": 8, "programs_per_sm": 2, "num_stages": 3, "short_div": True, "pow2_mul": True, "tile_base": True},
    {"num_warps": 4, "programs_per_sm": 4, "num_stages": 3, "short_div": True, "tile_base": True, "evict_first": False},
    {"fast_div": False, "pow2_mul": True, "tile_base": True},
]


def _label(variant: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in variant.items())


if not INTERPRETING:

    def test_variants_match_torch_path_under_interpreter() -> None:
        rerun_under_triton_interpreter(__file__, timeout_s=900)

else:
    from conversion_core_deepgemm_fp8 import triton_kernels as tk

    import conversion_core as cc
    from conversion_core import testing as kit

    def _extremes() -> torch.Tensor:
        """The rounding row at scales 1, 2^-20 and 2^60 (464 past 448), and one block of amax near
        float32's max (UE8M0 scale 2^120, where the 240 limit binds)."""
        row = kit.e4m3_rounding_row()
        src = torch.zeros(256, 140)
        src[:3, :11] = torch.stack([row, row * 2.0**-20, row * 2.0**60])
        src[128:132, 128:133] = 3.0e38
        src[129, 130] = -3.4028234663852886e38
        src[128, 128] = 248.0 * 2.0**120
        return src

    def _sources() -> list[tuple[str, torch.Tensor]]:
        """Many magnitudes per row and element (some blocks below UE8M0's 1e-4 floor)."""
        return [
            ("200x300 bf16", kit.spread_weights((200, 300), torch.bfloat16, 1)),
            ("2x130x257 bf16", kit.spread_weights((2, 130, 257), torch.bfloat16, 2)),
            ("129x127 fp32", kit.spread_weights((129, 127), torch.float32, 3)),
            ("1x700 fp16", kit.spread_weights((1, 700), torch.float16, 4)),
            *((view, kit.non_contiguous_view(view, kit.spread_weights, seed=5)) for view in kit.NON_CONTIGUOUS_VIEWS),
            ("extremes fp32", _extremes()),
        ]

    def _launch(name: str, src: torch.Tensor, config: tk.BlockConfig) -> tuple[torch.Tensor, torch.Tensor, int]:
        out, scale = kit.poisoned_allocate(cc.load_registry().get(name), src.shape)
        flag = torch.zeros(1, dtype=torch.int32)
        tk.launch_blocks(src, out, scale, flag, (128, 128), ue8m0=name == UE8M0, config=config)
        return out, scale, int(flag)

    def test_interpreter_really_runs_the_triton_kernel() -> None:
        assert type(tk._quantize_tile_kernel).__name__ == "InterpretedFunction"

    @pytest.mark.parametrize("name", [BLOCK, UE8M0])
    @pytest.mark.parametrize("variant", VARIANTS, ids=_label)
    def test_variant_bytes_match(name: str, variant: dict) -> None:
        config = tk.BlockConfig(**variant)
        for label, src in _sources():
            want = kit.convert_on_backend(cc.load_registry().get(name), src, "torch")
            q, s, flag = _launch(name, src, config)
            kit.assert_same_bytes((q, s), want, label)
            assert flag == 0, label

    @pytest.mark.parametrize("name", [BLOCK, UE8M0])
    @pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
    def test_variants_flag_non_finite(name: str, bad: float) -> None:
        src = kit.spread_weights((3, 40, 130), torch.bfloat16, seed=8)
        src.view(-1)[src.numel() - 7] = bad  # in the last, partial block
        for variant in VARIANTS[3:5]:
            assert _launch(name, src, tk.BlockConfig(**variant))[2] == 1, variant

    def test_tile_base_falls_back_to_int64_offsets_when_a_tile_spans_2_31_elements() -> None:
        small = torch.empty(2, 256, 384)
        assert tk._tile_offsets_fit(small, small, 128, 128)
        wide = torch.empty_strided((1, 2, 2), (0, 2**25, 1), device="meta")  # 127 rows of 2^25 elements
        assert not tk._tile_offsets_fit(wide, small, 128, 128)
        # a source whose tiles are compact, but 127 rows of its (E, N, K) e4m3 output are not
        long_rows = torch.empty_strided((1, 2, 2**24 + 2**20), (0, 1, 0), device="meta")
        assert not tk._tile_offsets_fit(long_rows, long_rows, 128, 128)

    def test_device_defaults_are_block_configs() -> None:
        assert all(isinstance(c, tk.BlockConfig) for c in tk.DEVICE_CONFIGS.values())
        assert tk.config_for(torch.device("cpu")) == tk.DEFAULT_CONFIG
