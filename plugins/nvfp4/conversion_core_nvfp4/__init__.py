"""conversion-core plugin: NVFP4 weights (FP4 e2m1 packed, an e4m3 scale per 16, an fp32 global scale).

Two layouts of the same quantization, each its own compile target, because the global scale is
a divisor in one and a multiplier in the other and a receiver must be able to refuse the other:

- ``nvfp4`` (compressed-tensors ``nvfp4-pack-quantized``, llm-compressor ``NVFP4A16``):
  ``weight_packed`` uint8 ``(N, K/2)``, ``weight_scale`` e4m3 ``(N, K/16)``,
  ``weight_global_scale`` float32 ``(1,)``, ``w ~ fp4 * weight_scale / weight_global_scale``;
- ``nvfp4_modelopt`` (NVIDIA ModelOpt ``quant_algo: NVFP4``): ``weight`` uint8 ``(N, K/2)``,
  ``weight_scale`` e4m3 ``(N, K/16)``, ``weight_scale_2`` float32 scalar ``()``,
  ``w ~ fp4 * weight_scale * weight_scale_2``; ``weight_scale_2 = fl32(1 / weight_global_scale)``,
  the same bytes otherwise.

Stacked experts ``(E, N, K)`` add a leading ``E`` to the values and scales and keep one global
scale for the whole stack (its gate/up halves share it). The numerics are in :mod:`.numerics`;
fused sets (q/k/v, gate/up) share one global scale through ``cc.SharedAmax`` and
:func:`conversion_core.formats.fused.fused_sets`. ``launch_group`` converts a run of standalone
tensors (``convert_many``, the plan's step) in two launches per group of same-shaped sources.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

import conversion_core as cc
from conversion_core.backend import use_triton

from . import configs, numerics
from .numerics import GROUP

NAME = "nvfp4"
MODELOPT_NAME = "nvfp4_modelopt"
E4M3 = torch.float8_e4m3fn

_METADATA: dict[str, Any] = {
    "dtype": "e2m1",
    "packing": "2_per_byte_low_nibble_first",
    "group_size": GROUP,
    "scale_dtype": "e4m3",
    "global_scale_dtype": "float32",
}
COMPILE_METADATA = {**_METADATA, "global_scale": "divisor"}
MODELOPT_METADATA = {**_METADATA, "global_scale": "multiplier"}


def _checked_k(shape: tuple[int, ...], name: str) -> tuple[int, ...]:
    numerics.check_k(name, shape)
    return shape


def packed_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Two values per byte. Total, unlike :func:`scale_shape` (which refuses a K not a multiple of 16
    for the whole tensor): the DTensor path asks it for a shard's local shape, and a shard that cuts
    a 16-group (K = 48 over 4 ranks: 12 columns) is valid; a byte cut in two is refused by the core."""
    *lead, k = tuple(shape)
    return (*lead, -(-k // 2))


def scale_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    *lead, k = _checked_k(tuple(shape), NAME)
    return (*lead, k // GROUP)


def _write(
    src: torch.Tensor, amax: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, name: str
) -> torch.Tensor:
    """Values and group scales from the set's amax (Triton on CUDA, the torch path otherwise); returns gs."""
    if use_triton(src) and src.numel():
        from . import triton_kernels

        return triton_kernels.quantize_with_amax(src, amax, packed, scales, name)
    return numerics.quantize_with_amax(src, amax, packed, scales, name)


def apply(src: torch.Tensor, amax: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, gs: torch.Tensor) -> None:
    """``cc.SharedAmax.apply`` of ``nvfp4``: the global scale from the fused set's amax."""
    gs.copy_(_write(src, amax.to(src.device), packed, scales, NAME))


def apply_modelopt(
    src: torch.Tensor, amax: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, scale_2: torch.Tensor
) -> None:
    """``cc.SharedAmax.apply`` of ``nvfp4_modelopt``: the multiplier ``fl32(1 / gs)``."""
    scale_2.copy_(reciprocal(_write(src, amax.to(src.device), packed, scales, MODELOPT_NAME)).reshape(()))


def reciprocal(gs: torch.Tensor) -> torch.Tensor:
    """IEEE float32 ``1 / gs`` (a tensor division: never a fast reciprocal)."""
    return torch.div(torch.ones_like(gs), gs)


def quantize(src: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, gs: torch.Tensor) -> None:
    """``fn``: the tensor alone (its own amax)."""
    apply(src, numerics.tensor_amax(src), packed, scales, gs)


def quantize_modelopt(src: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, scale_2: torch.Tensor) -> None:
    apply_modelopt(src, numerics.tensor_amax(src), packed, scales, scale_2)


def launch_apply(
    src: torch.Tensor,
    amax: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    gs: torch.Tensor,
    flag: torch.Tensor,
) -> None:
    """Sync-free twin of :func:`apply` (the whole-model step): NaN/Inf sets ``flag``."""
    from . import triton_kernels

    triton_kernels.launch_fused(src, amax, packed, scales, gs, flag, multiplier=False)


def launch_apply_modelopt(
    src: torch.Tensor,
    amax: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    s2: torch.Tensor,
    flag: torch.Tensor,
) -> None:
    from . import triton_kernels

    triton_kernels.launch_fused(src, amax, packed, scales, s2, flag, multiplier=True)


def launch(src: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, gs: torch.Tensor, flag: torch.Tensor) -> None:
    from . import triton_kernels  # the amax in one read-only Triton pass (torch's abs().amax() writes a temporary)

    launch_apply(src, triton_kernels.tensor_amax(src), packed, scales, gs, flag)


def launch_modelopt(
    src: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, s2: torch.Tensor, flag: torch.Tensor
) -> None:
    from . import triton_kernels

    launch_apply_modelopt(src, triton_kernels.tensor_amax(src), packed, scales, s2, flag)


def launch_group(calls: Sequence[tuple[Any, ...]], flag: torch.Tensor) -> None:
    """``launch`` for a run of calls, each with its own tensor amax: a grouped amax pass and a grouped
    quantizer, two Triton launches per group of same-shaped sources instead of two per tensor.

    Only tensors that stand alone come here: the plan launches the members of a fused set (one
    global scale for q/k/v, gate/up) one by one through ``shared_amax.launch`` with the set's amax.
    """
    from . import triton_kernels

    triton_kernels.launch_group(calls, flag, multiplier=False)


def launch_group_modelopt(calls: Sequence[tuple[Any, ...]], flag: torch.Tensor) -> None:
    from . import triton_kernels

    triton_kernels.launch_group(calls, flag, multiplier=True)


def sharded_apply(
    x: torch.Tensor,
    amax: torch.Tensor,
    block_amax: torch.Tensor,
    grid: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    global_out: torch.Tensor,
    *,
    multiplier: bool = False,
) -> None:
    """``cc.SharedAmax.sharded_apply``: a shard that cuts 16-groups; every group amax is given.

    ``grid`` is laid out like the local ``weight_scale``; ``block_amax`` is each element's group amax.
    """
    gs = numerics.global_scale(amax.reshape(1).to(x.device))
    scales.copy_(numerics.group_scales(grid.reshape(scales.shape), gs).to(E4M3))
    step = torch.div(numerics.group_scales(block_amax, gs), gs)
    v = torch.div(x.float(), step).clamp_(-numerics.FP4_MAX, numerics.FP4_MAX)
    packed.copy_(numerics.pack_codes(numerics.e2m1_codes(v)))
    global_out.copy_((reciprocal(gs) if multiplier else gs).reshape(global_out.shape))


def sharded_apply_modelopt(*args: torch.Tensor) -> None:
    sharded_apply(*args, multiplier=True)


def _no_block_apply(*args: Any) -> None:
    raise cc.ConversionTypeError(f"{NAME}: sharded sources go through shared_amax.sharded_apply")


def statistic_block(shape: tuple[int, ...]) -> tuple[int, ...]:
    """One group amax per 16 elements along K of every row (and expert)."""
    return (*(1,) * (len(shape) - 1), GROUP)


def element_scale(packed: torch.Tensor, scales: torch.Tensor, gs: torch.Tensor) -> torch.Tensor:
    """Each element's dequantization step ``scale / gs`` (for the conformance kit's error bound)."""
    return (scales.float() / gs.float().reshape(-1)[0]).repeat_interleave(GROUP, dim=-1)


def element_scale_modelopt(packed: torch.Tensor, scales: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    return (scales.float() * s2.float().reshape(-1)[0]).repeat_interleave(GROUP, dim=-1)


def dequantize_modelopt(packed: torch.Tensor, scales: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """float32 ``e2m1 * weight_scale * weight_scale_2`` (ModelOpt's reading)."""
    ones = torch.ones(1, dtype=torch.float32, device=packed.device)
    return numerics.dequantize(packed, scales, ones) * s2.float().reshape(-1)[0]


def _outputs(main: str, global_name: str, global_shape: tuple[int, ...]) -> tuple[cc.Output, ...]:
    return (
        cc.Output(main, torch.uint8, packed_shape),
        cc.Output("weight_scale", E4M3, scale_shape, placement="per_block"),
        cc.Output(global_name, torch.float32, lambda shape: global_shape, placement="replicated"),
    )


NVFP4 = cc.Conversion(
    name=NAME,
    fn=quantize,
    requires_scale=True,
    outputs=_outputs("weight_packed", "weight_global_scale", (1,)),
    compile_target="nvfp4_compressed_tensors",
    compile_metadata=COMPILE_METADATA,
    dequantize=numerics.dequantize,
    src_ndims=(2, 3),
    launch=launch,
    launch_group=launch_group,
    target_format=configs.compressed_tensors_target,
    sharded=cc.BlockAmax(block=statistic_block, apply=_no_block_apply),
    shared_amax=cc.SharedAmax(apply=apply, launch=launch_apply, sharded_apply=sharded_apply),
)

NVFP4_MODELOPT = cc.Conversion(
    name=MODELOPT_NAME,
    fn=quantize_modelopt,
    requires_scale=True,
    outputs=_outputs("weight", "weight_scale_2", ()),
    compile_target="nvfp4_modelopt",
    compile_metadata=MODELOPT_METADATA,
    dequantize=dequantize_modelopt,
    src_ndims=(2, 3),
    launch=launch_modelopt,
    launch_group=launch_group_modelopt,
    target_format=configs.modelopt_target,
    sharded=cc.BlockAmax(block=statistic_block, apply=_no_block_apply),
    shared_amax=cc.SharedAmax(apply=apply_modelopt, launch=launch_apply_modelopt, sharded_apply=sharded_apply_modelopt),
)


@cc.hookimpl
def register_conversion() -> list[cc.Conversion]:
    return [NVFP4, NVFP4_MODELOPT]


@cc.hookimpl
def default_rule() -> list[cc.Rule]:
    return [
        cc.Rule(
            conversion=NAME,
            predicate=configs.is_compressed_tensors_nvfp4,
            priority=200,
            name="compressed-tensors-nvfp4",
        ),
        cc.Rule(conversion=MODELOPT_NAME, predicate=configs.is_modelopt_nvfp4, priority=200, name="modelopt-nvfp4"),
    ]
