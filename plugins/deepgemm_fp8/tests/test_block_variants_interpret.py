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

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("CONVERSION_CORE_BACKEND") == "triton"

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
        env = dict(os.environ, TRITON_INTERPRET="1", CONVERSION_CORE_BACKEND="triton")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", __file__]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
        assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-2000:]

else:
    from conversion_core_deepgemm_fp8 import triton_kernels as tk

    import conversion_core as cc

    def _weights(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
        """Many magnitudes per row and element (some blocks below UE8M0's 1e-4 floor), a signed zero."""
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(shape, generator=g)
        x *= torch.exp(torch.empty(shape[:-1] + (1,)).uniform_(-14, 6, generator=g))
        x *= torch.exp(torch.empty(shape).uniform_(-4, 0, generator=g))
        x.view(-1)[min(3, x.numel() - 1)] = -0.0
        return x.to(dtype)

    def _extremes() -> torch.Tensor:
        """Ties to even, subnormal e4m3 ties, ±0, 464 past 448 (scale 1 and 2^60 rows), and one block of
        amax near float32's max (UE8M0 scale 2^120, where the 240 limit binds)."""
        row = torch.tensor([448.0, 17.0, 19.0, -17.0, 3 * 2.0**-10, 2.0**-10, -(2.0**-10), 0.0, -0.0, 240.0, 232.0])
        src = torch.zeros(256, 140)
        src[:3, :11] = torch.stack([row, row * 2.0**-20, row * 2.0**60])
        src[128:132, 128:133] = 3.0e38
        src[129, 130] = -3.4028234663852886e38
        src[128, 128] = 248.0 * 2.0**120
        return src

    def _sources() -> list[tuple[str, torch.Tensor]]:
        return [
            ("200x300 bf16", _weights((200, 300), torch.bfloat16, 1)),
            ("2x130x257 bf16", _weights((2, 130, 257), torch.bfloat16, 2)),
            ("129x127 fp32", _weights((129, 127), torch.float32, 3)),
            ("1x700 fp16", _weights((1, 700), torch.float16, 4)),
            ("transposed", _weights((300, 140), torch.bfloat16, 5).t()),
            ("column slice", _weights((140, 600), torch.float16, 6)[:, ::2]),
            ("experts permuted", _weights((130, 3, 200), torch.bfloat16, 7).permute(1, 0, 2)),
            ("extremes fp32", _extremes()),
        ]

    def _torch_path(name: str, src: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> tuple[torch.Tensor, torch.Tensor]:
        monkeypatch.setenv("CONVERSION_CORE_BACKEND", "torch")
        try:
            out, scale = cc.load_registry().get(name).convert(src)
        finally:
            monkeypatch.setenv("CONVERSION_CORE_BACKEND", "triton")
        return out.view(torch.uint8), scale

    def _launch(name: str, src: torch.Tensor, config: tk.BlockConfig) -> tuple[torch.Tensor, torch.Tensor, int]:
        out, scale = cc.load_registry().get(name).allocate(src.shape)
        assert scale is not None
        out.view(torch.uint8).fill_(0x7F)  # poison: NaN bytes wherever nothing is written
        scale.fill_(float("nan"))
        flag = torch.zeros(1, dtype=torch.int32)
        tk.launch_blocks(src, out, scale, flag, (128, 128), ue8m0=name == UE8M0, config=config)
        return out.view(torch.uint8), scale, int(flag)

    def test_interpreter_really_runs_the_triton_kernel() -> None:
        assert type(tk._quantize_tile_kernel).__name__ == "InterpretedFunction"

    @pytest.mark.parametrize("name", [BLOCK, UE8M0])
    @pytest.mark.parametrize("variant", VARIANTS, ids=_label)
    def test_variant_bytes_match(name: str, variant: dict, monkeypatch) -> None:
        config = tk.BlockConfig(**variant)
        for label, src in _sources():
            want_q, want_s = _torch_path(name, src, monkeypatch)
            q, s, flag = _launch(name, src, config)
            differing = int((q != want_q).sum())
            assert differing == 0, f"{label}: {differing} of {q.numel()} e4m3 bytes differ"
            assert torch.equal(s.view(torch.int32), want_s.view(torch.int32)), f"{label}: scales differ"
            assert flag == 0, label

    @pytest.mark.parametrize("name", [BLOCK, UE8M0])
    @pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
    def test_variants_flag_non_finite(name: str, bad: float) -> None:
        src = _weights((3, 40, 130), torch.bfloat16, seed=8)
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
