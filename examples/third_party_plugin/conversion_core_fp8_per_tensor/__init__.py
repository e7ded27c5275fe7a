"""Example third-party conversion-core plugin: FP8 e4m3 with one float32 scale per tensor.

The whole source tensor, 2D ``(N, K)`` or stacked experts ``(E, N, K)``, shares one
dequantization scale of shape ``(1,)`` (``w ≈ q * scale``), stored as ``weight_scale`` the way
compressed-tensors ``strategy: "tensor"`` checkpoints store it. For stacked experts it is one
scale for all experts; a per-expert variant would declare ``scale_shape`` ``(E, 1)``.

Numerics reuse ``conversion_core.formats.fp8`` so they round exactly like the built-in FP8 plugins:
``scale = max(amax, 1e-12) / 448``, ``q = e4m3(clamp(x / scale, ±448))``.
"""

from __future__ import annotations

from typing import Any

import torch

import conversion_core as cc
from conversion_core.formats.checkpoints import compressed_tensors_fp8_config, scale_target
from conversion_core.formats.fp8 import (
    E4M3,
    check_fp8_dequantize_args,
    compressed_tensors_fp8_weights,
    non_finite_error,
    quantize_into,
    quantize_with_amax,
    scale_from_amax,
)

NAME = "fp8_per_tensor"
SCALE_SHAPE = (1,)


def scale_shape(src_shape: tuple[int, ...]) -> tuple[int, ...]:
    return SCALE_SHAPE


def quantize(src: torch.Tensor, out: torch.Tensor, scale_out: torch.Tensor | None) -> None:
    """Write e4m3 bytes into ``out`` and the tensor's one scale into ``scale_out``.

    The core has already checked ``out`` and ``scale_out`` (dtype, shape, device, contiguity).
    """
    assert scale_out is not None
    x = src.float()
    amax = x.abs().amax().reshape(SCALE_SHAPE)
    if not bool(torch.isfinite(amax).all()):  # amax propagates NaN and Inf: refuse, never write NaN bytes
        raise non_finite_error(NAME, src.shape)
    scale = scale_from_amax(amax)
    quantize_into(x, scale, out)
    scale_out.copy_(scale)


def launch(src: torch.Tensor, out: torch.Tensor, scale_out: torch.Tensor | None, flag: torch.Tensor) -> None:
    """The sync-free twin of :func:`quantize` for the whole-model step (and its CUDA graphs).

    The same torch ops and bytes, but no host read: a NaN/Inf source adds to the int32 device
    ``flag`` instead of raising, and the plan, reading the flag once per step, names the tensor.
    Nothing here copies from the host, so the step can be captured in a CUDA graph: a plugin
    needs no kernel of its own for that.
    """
    assert scale_out is not None
    x = src.float()
    amax = x.abs().amax().reshape(SCALE_SHAPE)  # NaN and Inf propagate into amax
    flag.add_(torch.isfinite(amax).all().logical_not())
    scale = scale_from_amax(amax)
    quantize_into(x, scale, out)
    scale_out.copy_(scale)


def dequantize(q: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """float32 ``q * scale`` (the one scale broadcasts over every element)."""
    scale = check_fp8_dequantize_args(q, scale, NAME)
    return q.float() * scale


def statistic_block(shape: tuple[int, ...]) -> tuple[int, ...]:
    """One amax over the whole tensor, experts included (0: the whole dim)."""
    return (0,) * len(shape)


def target_format(qc: dict[str, Any]) -> cc.TargetFormat:
    """compressed-tensors ``strategy: "tensor"`` checkpoints: one ``weight_scale`` of shape (1,)."""
    return scale_target(
        qc, "weight_scale", per_row=False, written=lambda kept: compressed_tensors_fp8_config("tensor", kept)
    )


FP8_PER_TENSOR = cc.Conversion(
    name=NAME,
    fn=quantize,
    requires_scale=True,
    dst_dtype=E4M3,
    scale_shape=scale_shape,
    scale_name="weight_scale",
    compile_target="fp8_per_tensor",
    compile_metadata={"dtype": "e4m3", "scale_layout": "per_tensor", "scale_shape": list(SCALE_SHAPE)},
    dequantize=dequantize,
    src_ndims=(2, 3),
    target_format=target_format,
    sharded=cc.BlockAmax(block=statistic_block, apply=quantize_with_amax),
    launch=launch,
)


def is_compressed_tensors_fp8_tensor(qc: dict[str, Any]) -> bool:
    """compressed-tensors ``float-quantized`` FP8 with weights ``strategy: "tensor"``.

    No built-in rule claims this config, so installing the example changes no built-in dispatch.
    """
    weights = compressed_tensors_fp8_weights(qc)
    return weights is not None and weights.get("strategy") == "tensor"


@cc.hookimpl
def register_conversion() -> cc.Conversion:
    return FP8_PER_TENSOR


@cc.hookimpl
def default_rule() -> cc.Rule:
    return cc.Rule(
        conversion=NAME, predicate=is_compressed_tensors_fp8_tensor, priority=100, name="compressed-tensors-fp8-tensor"
    )
