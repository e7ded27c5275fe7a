"""conversion-core plugin: FP8 e4m3 with one scale per output channel, for cutlass ``scaled_mm``.

Weights ``(N, K)`` or stacked experts ``(E, N, K)``; one float32 dequantization scale per row
(``weight_scale``, shape ``(N,)`` or ``(E, N)``), amax taken over the whole row K.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

import conversion_core as cc
from conversion_core.backend import use_triton
from conversion_core.formats.checkpoints import compressed_tensors_fp8_config, scale_target
from conversion_core.formats.config_keys import validate_compressed_tensors, validate_hf_fp8
from conversion_core.formats.fp8 import (
    E4M3,
    check_fp8_dequantize_args,
    compressed_tensors_fp8_weights,
    is_dynamic_e4m3_fp8,
    is_fbgemm_fp8_config,
    quantize_with_amax,
)

from . import torch_path

NAME = "cutlass_fp8_e4m3_per_channel"


def scale_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(shape[:-1])


def quantize(src: torch.Tensor, out: torch.Tensor, scale_out: torch.Tensor | None) -> None:
    assert scale_out is not None  # the core's checks guarantee it
    if use_triton(src):
        from . import triton_kernels

        triton_kernels.quantize_rows(src, out, scale_out, NAME)
    else:
        torch_path.quantize_rows(src, out, scale_out, NAME)


def launch(src: torch.Tensor, out: torch.Tensor, scale_out: torch.Tensor | None, flag: torch.Tensor) -> None:
    """Queue the Triton kernel, no host sync: sets ``flag[0]`` on NaN/Inf (the whole-model plan's step)."""
    assert scale_out is not None
    if src.numel():
        from . import triton_kernels

        triton_kernels.launch_rows(src, out, scale_out, flag)


def launch_group(calls: Sequence[tuple[Any, ...]], flag: torch.Tensor) -> None:
    """``launch`` for a run of calls: one Triton launch per group of same-shaped sources."""
    from . import triton_kernels

    triton_kernels.launch_row_group(calls, flag)


def dequantize(q: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """float32 ``q * scale[..., None]``."""
    scale = check_fp8_dequantize_args(q, scale, NAME)
    return q.float() * scale.unsqueeze(-1)


def statistic_block(shape: tuple[int, ...]) -> tuple[int, ...]:
    """One amax per row (the whole K): what a sharded source reduces across ranks."""
    return (*(1,) * (len(shape) - 1), 0)


def target_format(qc: dict[str, Any]) -> cc.TargetFormat:
    """compressed-tensors ``channel`` checkpoints (``weight_scale`` stored ``(N, 1)``) unless the
    config names another family; an HF ``fp8`` config is written as compressed-tensors, which vLLM
    loads per-channel."""
    return scale_target(
        qc, "weight_scale", per_row=True, written=lambda kept: compressed_tensors_fp8_config("channel", kept)
    )


CUTLASS_FP8_PER_CHANNEL = cc.Conversion(
    name=NAME,
    fn=quantize,
    requires_scale=True,
    dst_dtype=E4M3,
    scale_shape=scale_shape,
    scale_name="weight_scale",
    compile_target="cutlass_fp8",
    compile_metadata={
        "dtype": "e4m3",
        "scale_layout": "per_channel",
        "scale_axis": -1,
        "activation_scheme": "dynamic",
    },
    dequantize=dequantize,
    src_ndims=(2, 3),
    launch=launch,
    launch_group=launch_group,
    target_format=target_format,
    sharded=cc.BlockAmax(block=statistic_block, apply=quantize_with_amax),
)


def is_fp8_cutlass_format(qc: dict[str, Any]) -> bool:
    """``quant_format: cutlass`` (a [128, 128] block config also matches; DeepGEMM outranks it)."""
    return (
        is_dynamic_e4m3_fp8(qc)
        and qc.get("quant_format") == "cutlass"
        and qc.get("weight_block_size") in (None, [128, 128])
    )


def is_fp8_dynamic_without_blocks(qc: dict[str, Any]) -> bool:
    """``fp8`` without blocks and with dynamic activations: the seed's per-channel reading."""
    return is_dynamic_e4m3_fp8(qc) and qc.get("weight_block_size") is None and qc.get("activation_scheme") == "dynamic"


def is_compressed_tensors_channel(qc: dict[str, Any]) -> bool:
    """compressed-tensors ``float-quantized`` FP8 with weights ``strategy: channel`` (RedHatAI FP8-dynamic).

    The checkpoint stores the scale as ``weight_scale`` of shape (N, 1).
    """
    weights = compressed_tensors_fp8_weights(qc)
    return weights is not None and weights.get("strategy") == "channel" and weights.get("block_structure") is None


def is_fbgemm_fp8(qc: dict[str, Any]) -> bool:
    """transformers' ``fbgemm_fp8`` (Meta-Llama-3.1-405B-Instruct-FP8): per-channel weight scales."""
    return is_fbgemm_fp8_config(qc)


@cc.hookimpl
def register_conversion() -> cc.Conversion:
    return CUTLASS_FP8_PER_CHANNEL


@cc.hookimpl
def default_rule() -> list[cc.Rule]:
    return [
        cc.Rule(
            conversion=NAME,
            predicate=is_fp8_cutlass_format,
            priority=100,
            name="fp8-quant-format-cutlass",
            validate=validate_hf_fp8,
        ),
        cc.Rule(
            conversion=NAME,
            predicate=is_fp8_dynamic_without_blocks,
            priority=100,
            name="fp8-dynamic-no-blocks",
            validate=validate_hf_fp8,
        ),
        cc.Rule(
            conversion=NAME,
            predicate=is_compressed_tensors_channel,
            priority=100,
            name="compressed-tensors-fp8-channel",
            validate=validate_compressed_tensors,
        ),
        cc.Rule(conversion=NAME, predicate=is_fbgemm_fp8, priority=100, name="fbgemm-fp8", validate=validate_hf_fp8),
    ]
