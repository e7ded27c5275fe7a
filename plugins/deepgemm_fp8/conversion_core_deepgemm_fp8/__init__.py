"""conversion-core plugin: FP8 e4m3 with 128x128 block scales, the DeepGEMM / DeepSeek-V3 layout.

Weights ``(N, K)`` or stacked experts ``(E, N, K)``; one float32 dequantization scale per
128x128 block (``weight_scale_inv``, shape ``(ceil(N/128), ceil(K/128))``, ``(E, …)`` for
experts). Edge blocks cover only their valid elements; blocks never cross experts.

The distribution has a second entry point, ``deepgemm_fp8_ue8m0`` (module :mod:`.ue8m0`): the
same blocks with power-of-two scales, ``fp8_128x128_ue8m0``, for ``"scale_fmt": "ue8m0"`` configs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

import conversion_core as cc
from conversion_core.backend import use_triton
from conversion_core.formats.checkpoints import fp8_block_config, scale_target
from conversion_core.formats.config_keys import validate_compressed_tensors, validate_hf_fp8
from conversion_core.formats.fp8 import (
    E4M3,
    check_fp8_dequantize_args,
    compressed_tensors_fp8_weights,
    is_dynamic_e4m3_fp8,
    quantize_with_amax,
)

from . import torch_path

NAME = "fp8_128x128"
BLOCK = (128, 128)


def scale_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    *lead, n, k = shape
    return (*lead, -(-n // BLOCK[0]), -(-k // BLOCK[1]))


def quantize(src: torch.Tensor, out: torch.Tensor, scale_out: torch.Tensor | None) -> None:
    assert scale_out is not None  # the core's checks guarantee it
    if use_triton(src):
        from . import triton_kernels

        triton_kernels.quantize_blocks(src, out, scale_out, BLOCK, NAME)
    else:
        torch_path.quantize_blocks(src, out, scale_out, BLOCK, NAME)


def launch(src: torch.Tensor, out: torch.Tensor, scale_out: torch.Tensor | None, flag: torch.Tensor) -> None:
    """Queue the Triton kernel, no host sync: sets ``flag[0]`` on NaN/Inf (the whole-model plan's step)."""
    assert scale_out is not None
    if src.numel():
        from . import triton_kernels

        triton_kernels.launch_blocks(src, out, scale_out, flag, BLOCK)


def launch_group(calls: Sequence[tuple[Any, ...]], flag: torch.Tensor) -> None:
    """``launch`` for a run of calls: one Triton launch per group of same-shaped sources."""
    from . import triton_kernels

    triton_kernels.launch_block_group(calls, flag, BLOCK)


def dequantize(q: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """float32 ``q * scale`` with each block's scale broadcast over its 128x128 elements."""
    return dequantize_blocks(q, scale, NAME)


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor | None, conversion: str) -> torch.Tensor:
    """``dequantize`` for any 128x128 block conversion of this plugin (errors name ``conversion``)."""
    scale = check_fp8_dequantize_args(q, scale, conversion)
    n, k = q.shape[-2:]
    full = scale.repeat_interleave(BLOCK[0], dim=-2).repeat_interleave(BLOCK[1], dim=-1)
    return q.float() * full[..., :n, :k]


def statistic_block(shape: tuple[int, ...]) -> tuple[int, ...]:
    """One amax per 128x128 block of each expert: what a sharded source reduces across ranks."""
    return (*(1,) * (len(shape) - 2), *BLOCK)


def target_format(qc: dict[str, Any]) -> cc.TargetFormat:
    """DeepSeek ``fp8`` checkpoints (``weight_scale_inv``), or compressed-tensors' ``weight_scale``."""
    return scale_target(qc, "weight_scale_inv", per_row=False, written=lambda kept: fp8_block_config(BLOCK, kept))


FP8_128X128 = cc.Conversion(
    name=NAME,
    fn=quantize,
    requires_scale=True,
    dst_dtype=E4M3,
    scale_shape=scale_shape,
    scale_name="weight_scale_inv",
    compile_target="deep_gemm_fp8",
    compile_metadata={"block_size": list(BLOCK), "scale_layout": "blockwise", "dtype": "e4m3"},
    dequantize=dequantize,
    src_ndims=(2, 3),
    launch=launch,
    launch_group=launch_group,
    target_format=target_format,
    sharded=cc.BlockAmax(block=statistic_block, apply=quantize_with_amax),
)


def is_fp8_block_128(qc: dict[str, Any]) -> bool:
    """HF ``fp8`` with ``weight_block_size: [128, 128]`` (DeepSeek-V3, Qwen3 FP8), ``fmt`` or not."""
    return is_dynamic_e4m3_fp8(qc) and qc.get("weight_block_size") == list(BLOCK)


def is_compressed_tensors_block_128(qc: dict[str, Any]) -> bool:
    """compressed-tensors ``float-quantized`` FP8, weights ``strategy: block`` of [128, 128].

    Same bytes as the ``fp8`` format; the checkpoint calls the scale ``weight_scale``, which
    the whole-model plan's scale naming follows from ``quant_method``.
    """
    weights = compressed_tensors_fp8_weights(qc)
    return weights is not None and weights.get("strategy") == "block" and weights.get("block_structure") == list(BLOCK)


@cc.hookimpl
def register_conversion() -> cc.Conversion:
    return FP8_128X128


@cc.hookimpl
def default_rule() -> list[cc.Rule]:
    return [
        cc.Rule(
            conversion=NAME,
            predicate=is_fp8_block_128,
            priority=200,
            name="fp8-block-128x128",
            validate=validate_hf_fp8,
        ),
        cc.Rule(
            conversion=NAME,
            predicate=is_compressed_tensors_block_128,
            priority=200,
            name="compressed-tensors-fp8-block-128x128",
            validate=validate_compressed_tensors,
        ),
    ]
