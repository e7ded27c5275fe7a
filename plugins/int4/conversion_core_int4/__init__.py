"""conversion-core plugin: int4 W4A16, compressed-tensors ``pack-quantized`` (llm-compressor ``W4A16``).

One conversion per (group size, symmetry): ``int4_w4a16_g{32,64,128,256}`` (symmetric, preset
``W4A16`` at group 128, Kimi-K2-Thinking style at 32) and ``int4_w4a16_asym_g{...}``
(``W4A16_ASYM``). For a weight ``(N, K)`` (stacked experts ``(E, N, K)``; groups never cross rows,
so never experts), with ``G = K / group`` (K must be a multiple of the group size, as
compressed-tensors requires):

| output | dtype | shape |
|---|---|---|
| ``weight_packed`` | int32 | ``(N, K/8)``: ``q + 8`` eight per word, lowest nibble first |
| ``weight_scale`` | bfloat16 | ``(N, G)`` |
| ``weight_shape`` | int64 | ``(2,)`` = ``[N, K]`` (``(3,)`` for a 3D stack) |
| ``weight_zero_point`` (asymmetric only) | int32 | ``(ceil(N/8), G)``: ``zp + 8`` packed along N |

The numerics (which function of compressed-tensors / llm-compressor decides each byte) are in
:mod:`.torch_path`; the one-pass Triton kernel (and its grouped launch, the conversions'
``launch_group``: one launch per run of like sources) in :mod:`.triton_kernels`; which configs select
which conversion, and what a converted checkpoint carries, in :mod:`.config`.

Sharded (DTensor) sources: the symmetric conversions declare a ``cc.BlockAmax`` over each row's
groups, so shards that cut groups all-reduce the group amax and give the unsharded bytes. The core
requires every block to be reduced before it writes a ``replicated`` output (``weight_shape``),
so a DTensor whose shards hold whole groups (``Shard(0)``, or ``Shard(-1)`` on group boundaries)
is refused with the core's one-line error: convert ``full_tensor()`` or shard across groups.
The asymmetric conversions need each group's signed min and max, which ``cc.BlockAmax`` (``max
|x|`` only) cannot reduce: they refuse DTensor sources.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

import conversion_core as cc
from conversion_core.backend import use_triton

from . import config, torch_path

#: Group sizes with a registered conversion (powers of two: the Triton kernel's tiles).
GROUP_SIZES = (32, 64, 128, 256)
COMPILE_TARGET = "compressed_tensors_pack_quantized_int4"
#: Rounding of a source element before quantizing (and of the scale): the weight's dtype.
COMPUTE_DTYPE = torch.bfloat16
Shape = tuple[int, ...]


def conversion_name(group: int, symmetric: bool) -> str:
    return f"int4_w4a16_g{group}" if symmetric else f"int4_w4a16_asym_g{group}"


def _packed_shape(src: Shape) -> Shape:
    *lead, k = src
    return (*lead, -(-k // torch_path.PER_WORD))


def _scale_shape(group: int) -> Any:
    def shape(src: Shape) -> Shape:
        *lead, k = src
        return (*lead, -(-k // group))

    return shape


def _zero_point_shape(group: int) -> Any:
    def shape(src: Shape) -> Shape:
        *lead, n, k = src
        return (*lead, -(-n // torch_path.PER_WORD), -(-k // group))

    return shape


def check_groups(name: str, shape: Sequence[int], group: int) -> None:
    """Refuse a K that is not a multiple of the group size (shape functions stay total, as the kit wants)."""
    k = int(shape[-1])
    if k % group:
        raise cc.ConversionInputError(
            f"conversion {name!r}: source of shape {tuple(shape)} has K={k}, not a multiple of group_size {group} "
            "(compressed-tensors refuses such weights too); leave the module unquantized (the config's ignore list)"
        )


def outputs(name: str, group: int, symmetric: bool) -> tuple[cc.Output, ...]:
    declared = [
        cc.Output("weight_packed", torch.int32, _packed_shape),
        cc.Output("weight_scale", COMPUTE_DTYPE, _scale_shape(group), placement="per_block"),
        cc.Output("weight_shape", torch.int64, lambda src: (len(src),), placement="replicated"),
    ]
    if not symmetric:
        # packed across rows: not laid out like the statistic grid; only used without sharding
        declared.append(cc.Output("weight_zero_point", torch.int32, _zero_point_shape(group), placement="per_block"))
    return tuple(declared)


def compile_metadata(group: int, symmetric: bool) -> dict[str, Any]:
    """The byte-affecting choices a receiver checks (JSON)."""
    return {
        "format": "pack-quantized",
        "num_bits": 4,
        "type": "int",
        "strategy": "group",
        "group_size": group,
        "symmetric": symmetric,
        "scale_dtype": "bfloat16",
        "packing": "int32_8_per_word_low_nibble_first_offset_8",
        **({} if symmetric else {"zero_point_packing": "int32_8_rows_per_word_low_nibble_first_offset_8"}),
    }


class Int4Format:
    """The functions of one (group size, symmetry) conversion."""

    def __init__(self, group: int, symmetric: bool) -> None:
        self.group, self.symmetric = group, symmetric
        self.name = conversion_name(group, symmetric)

    def _split(
        self, buffers: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        packed, scale, shape, *rest = buffers
        return packed, scale, shape, (rest[0] if rest else None)

    def quantize(self, src: torch.Tensor, *buffers: torch.Tensor) -> None:
        packed, scale, shape, zp = self._split(buffers)
        check_groups(self.name, src.shape, self.group)
        if use_triton(src) and src.numel():
            from . import triton_kernels

            triton_kernels.quantize(src, packed, scale, shape, zp, self.group, self.name)
        else:
            torch_path.quantize(src, packed, scale, shape, zp, self.group, self.name)

    def launch(self, src: torch.Tensor, *buffers: torch.Tensor) -> None:
        """Queue the Triton kernel, no host sync: ``flag[0]`` set on NaN/Inf (the plan's step, CUDA graphs)."""
        *outs, flag = buffers
        packed, scale, shape, zp = self._split(outs)
        check_groups(self.name, src.shape, self.group)
        from . import triton_kernels

        triton_kernels.launch(src, packed, scale, shape, zp, flag, self.group)

    def launch_group(self, calls: Sequence[tuple[Any, ...]], flag: torch.Tensor) -> None:
        """``launch`` for a run of ``(src, *buffers)``: one Triton launch per group of like sources (shape,
        dtype, layout), so sources at new addresses every step cost a table, not a launch each.

        Every K is checked before anything is queued; the bytes and the flag are those of ``launch``.
        """
        for src, *_ in calls:
            check_groups(self.name, src.shape, self.group)
        from . import triton_kernels

        triton_kernels.launch_group(calls, flag, self.group)

    def dequantize(self, *buffers: torch.Tensor) -> torch.Tensor:
        packed, scale, shape, zp = self._split(buffers)
        return torch_path.dequantize(packed, scale, shape, zp, self.group)

    def element_scale(self, *buffers: torch.Tensor) -> torch.Tensor:
        """Each element's dequantization multiplier (for the conformance kit's bound)."""
        scale = buffers[1]
        return scale.float().repeat_interleave(self.group, dim=-1)

    def apply_sharded(self, x: torch.Tensor, amax: torch.Tensor, grid: torch.Tensor, *buffers: torch.Tensor) -> None:
        packed, scale, shape, _ = self._split(buffers)
        check_groups(self.name, (*grid.shape[:-1], grid.shape[-1] * self.group), self.group)
        torch_path.apply_sharded(x, amax, grid, packed, scale, shape, self.group, self.name)

    def statistic_block(self, shape: Shape) -> Shape:
        """One statistic per group of ``group`` elements of a row (never across rows or experts)."""
        return (*(1,) * (len(shape) - 1), self.group)

    def conversion(self) -> cc.Conversion:
        return cc.Conversion(
            name=self.name,
            fn=self.quantize,
            requires_scale=True,
            outputs=outputs(self.name, self.group, self.symmetric),
            compile_target=COMPILE_TARGET,
            compile_metadata=compile_metadata(self.group, self.symmetric),
            dequantize=self.dequantize,
            src_ndims=(2, 3),
            launch=self.launch,
            launch_group=self.launch_group,
            target_format=lambda qc: config.target_format(qc, self.group, self.symmetric),
            sharded=cc.BlockAmax(block=self.statistic_block, apply=self.apply_sharded) if self.symmetric else None,
        )


FORMATS = {conversion_name(g, sym): Int4Format(g, sym) for sym in (True, False) for g in GROUP_SIZES}
CONVERSIONS = [f.conversion() for f in FORMATS.values()]


@cc.hookimpl
def register_conversion() -> list[cc.Conversion]:
    return CONVERSIONS


@cc.hookimpl
def default_rule() -> list[cc.Rule]:
    return [
        cc.Rule(
            conversion=f.name,
            predicate=config.selects(f.group, f.symmetric, GROUP_SIZES),
            priority=100,
            name=f"compressed-tensors-w4a16-{'sym' if f.symmetric else 'asym'}-g{f.group}",
        )
        for f in FORMATS.values()
    ]
