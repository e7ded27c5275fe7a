"""Every launch variant of the per-channel kernel, run by Triton's CPU interpreter, writes the torch path's bytes.

benchmarks/gpu_grouped.py times these :class:`RowConfig` variants on a GPU and ``DEVICE_TUNING``
is picked from them, so each must be bit-identical to the torch path. ``TRITON_INTERPRET`` must be
set before the kernels are decorated, so a normal pytest run re-runs this file in a child process
with ``TRITON_INTERPRET=1`` and ``CONVERSION_CORE_BACKEND=triton``. The interpreter proves the
arithmetic (numpy float32, a true FMA) and the indexing; GPU bytes are compared by tests/gpu and
the benchmark's check section.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("CONVERSION_CORE_BACKEND") == "triton"

CHANNEL = "cutlass_fp8_e4m3_per_channel"

#: Whole rows read once, rows in chunks (two passes), a persistent grid: each with ``short_div``.
VARIANTS = [
    {"rows": 4, "block_k": 1024, "single": True, "num_warps": 4, "short_div": True},
    {"rows": 8, "block_k": 128, "single": False, "num_warps": 4, "short_div": True},
    {"rows": 1, "block_k": 256, "single": False, "num_warps": 8, "programs_per_sm": 2, "short_div": True},
    {"rows": 2, "block_k": 512, "single": False, "num_warps": 4, "fast_div": False, "short_div": True},
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
    from conversion_core_cutlass_fp8 import triton_kernels as tk

    import conversion_core as cc

    def _weights(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
        """Many magnitudes per row and element, a signed zero."""
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(shape, generator=g)
        x *= torch.exp(torch.empty(shape[:-1] + (1,)).uniform_(-14, 6, generator=g))
        x *= torch.exp(torch.empty(shape).uniform_(-4, 0, generator=g))
        x.view(-1)[min(3, x.numel() - 1)] = -0.0
        return x.to(dtype)

    def _extremes() -> torch.Tensor:
        """Ties to even, subnormal e4m3 ties, ±0, rows at scale 1, 2^-20 and 2^60, a row near float32's max."""
        row = torch.tensor([448.0, 17.0, 19.0, -17.0, 3 * 2.0**-10, 2.0**-10, -(2.0**-10), 0.0, -0.0, 240.0, 232.0])
        huge = torch.full((11,), 3.0e38)
        huge[2] = -3.4028234663852886e38
        return torch.stack([row, row * 2.0**-20, row * 2.0**60, huge, torch.zeros(11)])

    def _sources() -> list[tuple[str, torch.Tensor]]:
        return [
            ("37x300 bf16", _weights((37, 300), torch.bfloat16, 1)),
            ("2x13x257 bf16", _weights((2, 13, 257), torch.bfloat16, 2)),
            ("9x1024 fp32", _weights((9, 1024), torch.float32, 3)),
            ("1x700 fp16", _weights((1, 700), torch.float16, 4)),
            ("transposed", _weights((300, 14), torch.bfloat16, 5).t()),
            ("column slice", _weights((14, 600), torch.float16, 6)[:, ::2]),
            ("experts permuted", _weights((13, 3, 200), torch.bfloat16, 7).permute(1, 0, 2)),
            ("extremes fp32", _extremes()),
        ]

    def _torch_path(src: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> tuple[torch.Tensor, torch.Tensor]:
        monkeypatch.setenv("CONVERSION_CORE_BACKEND", "torch")
        try:
            out, scale = cc.load_registry().get(CHANNEL).convert(src)
        finally:
            monkeypatch.setenv("CONVERSION_CORE_BACKEND", "triton")
        return out.view(torch.uint8), scale

    def _launch(src: torch.Tensor, config: tk.RowConfig) -> tuple[torch.Tensor, torch.Tensor, int]:
        out, scale = cc.load_registry().get(CHANNEL).allocate(src.shape)
        assert scale is not None
        out.view(torch.uint8).fill_(0x7F)  # poison: NaN bytes wherever nothing is written
        scale.fill_(float("nan"))
        flag = torch.zeros(1, dtype=torch.int32)
        tk.launch_rows(src, out, scale, flag, config)
        return out.view(torch.uint8), scale, int(flag)

    @pytest.mark.parametrize("variant", VARIANTS, ids=_label)
    def test_variant_bytes_match(variant: dict, monkeypatch) -> None:
        config = tk.RowConfig(**variant)
        for label, src in _sources():
            if config.single and src.shape[-1] > config.block_k:
                continue  # a single load holds the whole row
            want_q, want_s = _torch_path(src, monkeypatch)
            q, s, flag = _launch(src, config)
            differing = int((q != want_q).sum())
            assert differing == 0, f"{label}: {differing} of {q.numel()} e4m3 bytes differ"
            assert torch.equal(s.view(torch.int32), want_s.view(torch.int32)), f"{label}: scales differ"
            assert flag == 0, label

    @pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
    def test_variants_flag_non_finite(bad: float) -> None:
        src = _weights((3, 5, 130), torch.bfloat16, seed=8)
        src.view(-1)[src.numel() - 7] = bad  # in the last row
        for variant in VARIANTS:
            assert _launch(src, tk.RowConfig(**variant))[2] == 1, variant

    def test_device_tuning_leaves_the_cpu_pick_alone() -> None:
        assert tk.config_for(2048, torch.device("cpu")) == tk.pick_config(2048)
        fields = {f for f in tk.RowConfig.__dataclass_fields__}
        assert all(set(changes) <= fields for tuning in tk.DEVICE_TUNING.values() for _, changes in tuning)
