"""conversion-core plugin: MXFP8 and MXFP4 weights in the compressed-tensors layouts.

Weights ``(N, K)`` or stacked experts ``(E, N, K)``, K a multiple of 32; one E8M0 scale byte per
32 consecutive elements of a row (``weight_scale`` uint8 ``(..., K/32)``, value
``2**(byte - 127)``):

- ``mxfp8`` (compressed-tensors format ``mxfp8-quantized``): ``weight`` float8_e4m3fn ``(..., K)``;
- ``mxfp4`` (``mxfp4-pack-quantized``): ``weight_packed`` uint8 ``(..., K/2)``, two e2m1 codes per
  byte, element ``2i`` in the low nibble.

The numerics (:mod:`.numerics`) are compressed-tensors 0.19's, read in its source: the scale
exponent of ``generate_mx_scales`` / ``round_to_power_2`` (``quantization/utils/mxfp_utils.py``),
the uint8 storage of ``compress_mx_scale`` (``compressors/mx_utils.py``), the division, clamp and
cast of ``forward_helpers._quantize`` with ``round_to_quantized_type_args``, e2m1 rounding of
``fp4_utils.cast_to_fp4`` and nibble order of ``nvfp4/helpers.pack_fp4_to_uint8``. The tests in
``tests/judges`` compare every byte with llm-compressor's ``model_free_ptq``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

import conversion_core as cc
from conversion_core.backend import use_triton
from conversion_core.formats.e8m0 import MX_GROUP, e8m0_values, mx_scale_codes
from conversion_core.formats.fp4 import e2m1_values, unpack_e2m1
from conversion_core.formats.fp8 import E4M3
from conversion_core.formats.modules import module_keep

from . import config, torch_path
from .numerics import MXFP4, MXFP8, MxFormat, group_scales, write_values

COMPILE_TARGETS = {"mxfp8": "mx_e4m3_e8m0_g32", "mxfp4": "mx_e2m1_e8m0_g32"}


def _metadata(fmt: MxFormat) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "dtype": "e4m3" if fmt is MXFP8 else "e2m1",
        "group_size": MX_GROUP,
        "scale_dtype": "e8m0",
        "scale_layout": "row_groups",
        "scale_rounding": "compressed_tensors_round_to_power_2",
    }
    if fmt is MXFP4:
        meta["packing"] = "two_per_byte_low_nibble_first"
    return meta


def element_scales(scale: torch.Tensor) -> torch.Tensor:
    """float32 ``2**(byte - 127)`` repeated over each group's 32 elements."""
    return e8m0_values(scale).repeat_interleave(MX_GROUP, dim=-1)


def _check_dequantize(name: str, q: Any, scale: Any, dtype: torch.dtype) -> None:
    if not isinstance(q, torch.Tensor) or not isinstance(scale, torch.Tensor):
        raise cc.ConversionTypeError(f"conversion {name!r}: dequantize(values, weight_scale) takes two tensors")
    if q.dtype != dtype or scale.dtype != torch.uint8:
        raise cc.ConversionInputError(
            f"conversion {name!r}: dequantize expects {dtype} values and uint8 weight_scale, "
            f"got {q.dtype}, {scale.dtype}"
        )


def dequantize_mxfp8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 ``q * 2**(byte - 127)`` per group (exact)."""
    _check_dequantize("mxfp8", q, scale, E4M3)
    return q.float() * element_scales(scale)


def dequantize_mxfp4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 ``e2m1(code) * 2**(byte - 127)`` per group (exact)."""
    _check_dequantize("mxfp4", packed, scale, torch.uint8)
    return e2m1_values(unpack_e2m1(packed)) * element_scales(scale)


def _quantizer(fmt: MxFormat) -> Any:
    def quantize(src: torch.Tensor, q_out: torch.Tensor, s_out: torch.Tensor) -> None:
        if use_triton(src):
            from . import triton_kernels

            triton_kernels.quantize(src, q_out, s_out, fmt)
        else:
            torch_path.quantize(src, q_out, s_out, fmt)

    def launch(src: torch.Tensor, q_out: torch.Tensor, s_out: torch.Tensor, flag: torch.Tensor) -> None:
        """Queue the Triton kernel, no host sync: sets ``flag[0]`` on NaN/Inf (whole-model plan, CUDA graphs)."""
        if src.numel():
            from . import triton_kernels

            triton_kernels.launch(src, q_out, s_out, flag, fmt)

    def launch_group(calls: Sequence[tuple[Any, ...]], flag: torch.Tensor) -> None:
        """``launch`` for a run of calls: one Triton launch per group of like sources (shape, dtype,
        layout, words or generic kernel), so sources at new addresses every step cost a table, not a launch each."""
        from . import triton_kernels

        triton_kernels.launch_group(calls, flag, fmt)

    def apply_sharded(
        x: torch.Tensor, amax: torch.Tensor, grid: torch.Tensor, q_out: torch.Tensor, s_out: torch.Tensor
    ) -> None:
        """``cc.BlockAmax.apply``: the global group amax per element (a group cut by a shard boundary)."""
        codes, recip, limit = group_scales(amax.contiguous(), fmt)  # per element: its group's global amax
        v = torch.maximum(torch.minimum(x.float().mul(recip), limit), -limit)
        write_values(v, q_out.view(*x.shape[:-1], -1), fmt)
        s_out.copy_(mx_scale_codes(grid.contiguous(), fmt.offset).reshape(s_out.shape))

    return quantize, launch, launch_group, apply_sharded


def statistic_block(shape: tuple[int, ...]) -> tuple[int, ...]:
    """One amax per 32 consecutive elements of a row: what a sharded source reduces across ranks."""
    return (*(1,) * (len(shape) - 1), MX_GROUP)


def _target_format(fmt: MxFormat) -> Any:
    def target_format(qc: dict[str, Any]) -> cc.TargetFormat:
        """compressed-tensors names (``weight``/``weight_packed``, ``weight_scale``), its ignore list and targets."""
        if config.mx_format(qc) is not None:
            like = dict(qc)
            return cc.TargetFormat(quantization_config=lambda kept: config.with_kept(like, kept), keep=module_keep(qc))
        return cc.TargetFormat(
            quantization_config=lambda kept: config.default_config(_ct_format(fmt), kept),
            keep=module_keep(qc) if qc else None,
        )

    return target_format


def _ct_format(fmt: MxFormat) -> str:
    return "mxfp8-quantized" if fmt is MXFP8 else "mxfp4-pack-quantized"


def _conversion(fmt: MxFormat, values: str, dtype: torch.dtype, dequantize: Any) -> cc.Conversion:
    quantize, launch, launch_group, apply_sharded = _quantizer(fmt)
    return cc.Conversion(
        name=fmt.name,
        fn=quantize,
        requires_scale=True,
        outputs=(
            cc.Output(values, dtype, fmt.values_shape),
            cc.Output("weight_scale", torch.uint8, fmt.scale_shape, placement="per_block"),
        ),
        compile_target=COMPILE_TARGETS[fmt.name],
        compile_metadata=_metadata(fmt),
        dequantize=dequantize,
        src_ndims=(2, 3),
        launch=launch,
        launch_group=launch_group,
        target_format=_target_format(fmt),
        sharded=cc.BlockAmax(block=statistic_block, apply=apply_sharded),
    )


MXFP8_CONVERSION = _conversion(MXFP8, "weight", E4M3, dequantize_mxfp8)
MXFP4_CONVERSION = _conversion(MXFP4, "weight_packed", torch.uint8, dequantize_mxfp4)


@cc.hookimpl
def register_conversion() -> list[cc.Conversion]:
    return [MXFP8_CONVERSION, MXFP4_CONVERSION]


@cc.hookimpl
def default_rule() -> list[cc.Rule]:
    return [
        cc.Rule(conversion="mxfp8", predicate=config.claims("mxfp8"), priority=150, name="compressed-tensors-mxfp8"),
        cc.Rule(conversion="mxfp4", predicate=config.claims("mxfp4"), priority=150, name="compressed-tensors-mxfp4"),
    ]
