"""Example third-party conversion-core plugin: int8 rows with two companion tensors.

The format ``toy_two_scales`` (a toy: no engine loads it; it exists to show a format with a renamed
main output and two companions going through every path of the core). For a source ``(N, K)``
(or stacked experts ``(E, N, K)``), every row (the last dim) is quantized on its own:

- ``amax = max |x|`` over the row, in float32 (NaN or Inf anywhere: an error naming the shape);
- ``s = max(amax, 1e-12) / 127`` in float32 (``1e-12`` rounded to float32), the row's
  dequantization multiplier;
- ``weight_q``: int8 ``q = clamp(round_half_even(x / s), -127, 127)`` with IEEE float32 division;
- ``s`` is stored as two companions, its exact ``frexp`` split ``s = m * 2**e``:
  ``weight_scale`` float32 ``m`` in ``[0.5, 1)`` and ``weight_shift`` int8 ``e`` (``-46 <= e <= 122``
  for every finite bf16/fp16/fp32 source), one per row, shape ``src_shape[:-1]``;
- ``dequantize(q, m, e) = float32(q) * float32(m * 2**e)``: the float32 product ``q * s``.

A checkpoint stores the companions as columns, ``(N, 1)`` (``(E, N, 1)``), under
``<module>.weight_scale`` and ``<module>.weight_shift``; its ``quantization_config`` is
``{"quant_method": "toy_two_scales", "ignore": [kept modules]}``, which this plugin's rule claims.

Sharded (DTensor) sources: the statistic is the row amax (``cc.BlockAmax`` block ``(..., 1, 0)``),
so rows sharded (``Shard(0)``) convert locally and columns sharded (``Shard(1)``) all-reduce the row
maxima; both companions are per row (``per_block``), never one value per tensor, so every placement
of the source shards or replicates them without refusing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

import conversion_core as cc
from conversion_core.formats.checkpoints import matches_module

NAME = "toy_two_scales"
QUANT_METHOD = "toy_two_scales"
COMPILE_TARGET = "toy_two_scales_int8"
QMAX = 127.0
FLOOR = 1e-12

COMPILE_METADATA: dict[str, Any] = {
    "dtype": "int8",
    "qmax": 127,
    "scale_layout": "per_row",
    "scale_encoding": "frexp_mantissa_exponent",
    "rounding": "half_to_even",
}


def _rows(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(shape[:-1])


OUTPUTS = (
    cc.Output("weight_q", torch.int8, lambda shape: tuple(shape)),
    cc.Output("weight_scale", torch.float32, _rows, placement="per_block"),
    cc.Output("weight_shift", torch.int8, _rows, placement="per_block"),
)


def non_finite_error(shape: tuple[int, ...] | torch.Size) -> cc.ConversionInputError:
    return cc.ConversionInputError(
        f"{NAME}: source tensor of shape {tuple(shape)} holds NaN or Inf; refusing to write its bytes"
    )


def row_scale(amax: torch.Tensor) -> torch.Tensor:
    """``s = max(amax, 1e-12) / 127`` in float32.

    The constants are float32 tensors filled on ``amax``'s device (a Python number, or a CPU
    scalar, would let CUDA multiply by ``1/127`` instead of dividing; a host copy could not be
    captured in a CUDA graph).
    """
    amax = amax.float()
    return torch.maximum(amax, amax.new_full((), FLOOR)) / amax.new_full((), QMAX)


def _write(
    x: torch.Tensor, s_rows: torch.Tensor, s_elems: torch.Tensor, q: torch.Tensor, m: torch.Tensor, e: torch.Tensor
) -> None:
    """``q`` from each element's row scale; ``m``, ``e`` the exact frexp split of the row scales."""
    mantissa, exponent = torch.frexp(s_rows)
    m.copy_(mantissa.reshape(m.shape))
    e.copy_(exponent.reshape(e.shape))
    q.copy_(torch.round(x / s_elems).clamp_(-QMAX, QMAX))


def _row_amax(x: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] == 0:
        return torch.zeros(x.shape[:-1], dtype=torch.float32, device=x.device)
    return x.abs().amax(dim=-1)  # amax propagates NaN and Inf


def quantize(src: torch.Tensor, q: torch.Tensor, m: torch.Tensor, e: torch.Tensor) -> None:
    """Write ``weight_q``, ``weight_scale``, ``weight_shift`` (the core checked the buffers)."""
    x = src.float()
    amax = _row_amax(x)
    if not bool(torch.isfinite(amax).all()):
        raise non_finite_error(src.shape)
    s = row_scale(amax)
    _write(x, s, s.unsqueeze(-1), q, m, e)


def launch(src: torch.Tensor, q: torch.Tensor, m: torch.Tensor, e: torch.Tensor, flag: torch.Tensor) -> None:
    """The sync-free twin of :func:`quantize` (the whole-model step and its CUDA graphs): the same
    ops and bytes, a NaN/Inf source adds to the int32 device ``flag`` instead of raising."""
    x = src.float()
    amax = _row_amax(x)
    flag.add_(torch.isfinite(amax).all().logical_not())
    s = row_scale(amax)
    _write(x, s, s.unsqueeze(-1), q, m, e)


def apply_sharded(
    x: torch.Tensor, amax: torch.Tensor, grid: torch.Tensor, q: torch.Tensor, m: torch.Tensor, e: torch.Tensor
) -> None:
    """``cc.BlockAmax.apply``: ``amax`` is each element's global row amax, ``grid`` the rows' (local)."""
    _write(x.float(), row_scale(grid), row_scale(amax), q, m, e)


def scales_of(m: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """float32 ``m * 2**e``: exact (float64 holds the product; float32 holds it too for real rows)."""
    return (m.double() * torch.exp2(e.double())).float()


def dequantize(q: torch.Tensor, m: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """float32 ``q * s`` with ``s = m * 2**e`` per row."""
    if not all(isinstance(t, torch.Tensor) for t in (q, m, e)):
        raise cc.ConversionTypeError(f"{NAME}: dequantize(q, weight_scale, weight_shift) takes three tensors")
    rows = tuple(q.shape[:-1])
    if q.dtype != torch.int8 or m.dtype != torch.float32 or e.dtype != torch.int8:
        raise cc.ConversionInputError(
            f"{NAME}: dequantize expects int8 q, float32 weight_scale, int8 weight_shift; got {q.dtype}, {m.dtype}, "
            f"{e.dtype}"
        )
    if tuple(m.shape) != rows or tuple(e.shape) != rows:
        raise cc.ConversionInputError(
            f"{NAME}: dequantize of q {tuple(q.shape)} expects companions of shape {rows}; got {tuple(m.shape)} and "
            f"{tuple(e.shape)}"
        )
    return q.float() * scales_of(m, e).unsqueeze(-1)


def statistic_block(shape: tuple[int, ...]) -> tuple[int, ...]:
    """One statistic per row: 1 element along every leading dim, the whole last dim."""
    return (*(1,) * (len(shape) - 1), 0)


def _ignore_list(qc: Mapping[str, Any]) -> list[str]:
    value = qc.get("ignore", [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise cc.ConfigError(f"{NAME}: quantization_config['ignore'] must be a list of module names, got {value!r}")
    return list(value)


def written_config(kept: list[str]) -> dict[str, Any]:
    """The ``quantization_config`` a converted checkpoint carries."""
    return {"quant_method": QUANT_METHOD, "ignore": sorted(kept)}


def stored_shape(index: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The checkpoint convention stores the per-row companions as columns ``(..., N, 1)``."""
    return tuple(shape) if index == 0 else (*shape, 1)


def target_format(qc: Mapping[str, Any]) -> cc.TargetFormat:
    """Outputs under their declared names, companions as columns; the config's ``ignore`` list kept."""
    ignored = _ignore_list(qc) if qc.get("quant_method") == QUANT_METHOD else []

    def keep(tensor_name: str) -> str | None:
        for entry in ignored:
            if matches_module(entry, tensor_name):
                return f"ignored by quantization_config: {entry}"
        return None

    return cc.TargetFormat(stored_shape=stored_shape, quantization_config=written_config, keep=keep)


TOY_TWO_SCALES = cc.Conversion(
    name=NAME,
    fn=quantize,
    requires_scale=True,
    outputs=OUTPUTS,
    compile_target=COMPILE_TARGET,
    compile_metadata=COMPILE_METADATA,
    dequantize=dequantize,
    src_ndims=(2, 3),
    target_format=target_format,
    sharded=cc.BlockAmax(block=statistic_block, apply=apply_sharded),
    launch=launch,
)


def claims(qc: dict[str, Any]) -> bool:
    """The made-up config ``{"quant_method": "toy_two_scales", ...}``; no built-in rule claims it."""
    return qc.get("quant_method") == QUANT_METHOD


@cc.hookimpl
def register_conversion() -> cc.Conversion:
    return TOY_TWO_SCALES


@cc.hookimpl
def default_rule() -> cc.Rule:
    return cc.Rule(conversion=NAME, predicate=claims, priority=100, name="toy-two-scales")
