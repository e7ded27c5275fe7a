"""Every launch variant of the per-channel kernel, run by Triton's CPU interpreter, writes the torch path's bytes.

benchmarks/gpu_grouped.py times these :class:`RowConfig` variants on a GPU and ``DEVICE_TUNING``
is picked from them, so each must be bit-identical to the torch path. ``TRITON_INTERPRET`` must be
set before the kernels are decorated, so a normal pytest run re-runs this file in a child process
with ``TRITON_INTERPRET=1`` and ``CONVERSION_CORE_BACKEND=triton``. The interpreter proves the
arithmetic (numpy float32, a true FMA) and the indexing; GPU bytes are compared by tests/gpu and
the benchmark's check section.
"""

from __future__ import annotations

import pytest
import torch

from conversion_core.testing import rerun_under_triton_interpreter, under_triton_interpreter

pytest.importorskip("triton")

INTERPRETING = under_triton_interpreter()

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
        rerun_under_triton_interpreter(__file__, timeout_s=900)

else:
    from conversion_core_cutlass_fp8 import triton_kernels as tk

    import conversion_core as cc
    from conversion_core import testing as kit

    def _extremes() -> torch.Tensor:
        """The rounding row at scales 1, 2^-20 and 2^60, a row near float32's max, a zero row."""
        row = kit.e4m3_rounding_row()
        huge = torch.full((11,), 3.0e38)
        huge[2] = -3.4028234663852886e38
        return torch.stack([row, row * 2.0**-20, row * 2.0**60, huge, torch.zeros(11)])

    def _sources() -> list[tuple[str, torch.Tensor]]:
        return [
            ("37x300 bf16", kit.spread_weights((37, 300), torch.bfloat16, 1)),
            ("2x13x257 bf16", kit.spread_weights((2, 13, 257), torch.bfloat16, 2)),
            ("9x1024 fp32", kit.spread_weights((9, 1024), torch.float32, 3)),
            ("1x700 fp16", kit.spread_weights((1, 700), torch.float16, 4)),
            ("transposed", kit.spread_weights((300, 14), torch.bfloat16, 5).t()),
            ("column slice", kit.spread_weights((14, 600), torch.float16, 6)[:, ::2]),
            ("experts permuted", kit.spread_weights((13, 3, 200), torch.bfloat16, 7).permute(1, 0, 2)),
            ("extremes fp32", _extremes()),
        ]

    def _launch(src: torch.Tensor, config: tk.RowConfig) -> tuple[torch.Tensor, torch.Tensor, int]:
        out, scale = kit.poisoned_allocate(cc.load_registry().get(CHANNEL), src.shape)
        flag = torch.zeros(1, dtype=torch.int32)
        tk.launch_rows(src, out, scale, flag, config)
        return out, scale, int(flag)

    @pytest.mark.parametrize("variant", VARIANTS, ids=_label)
    def test_variant_bytes_match(variant: dict) -> None:
        config = tk.RowConfig(**variant)
        for label, src in _sources():
            if config.single and src.shape[-1] > config.block_k:
                continue  # a single load holds the whole row
            want = kit.convert_on_backend(cc.load_registry().get(CHANNEL), src, "torch")
            q, s, flag = _launch(src, config)
            kit.assert_same_bytes((q, s), want, label)
            assert flag == 0, label

    @pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
    def test_variants_flag_non_finite(bad: float) -> None:
        src = kit.spread_weights((3, 5, 130), torch.bfloat16, seed=8)
        src.view(-1)[src.numel() - 7] = bad  # in the last row
        for variant in VARIANTS:
            assert _launch(src, tk.RowConfig(**variant))[2] == 1, variant

    def test_device_tuning_leaves_the_cpu_pick_alone() -> None:
        assert tk.config_for(2048, torch.device("cpu")) == tk.pick_config(2048)
        fields = {f for f in tk.RowConfig.__dataclass_fields__}
        assert all(set(changes) <= fields for tuning in tk.DEVICE_TUNING.values() for _, changes in tuning)
