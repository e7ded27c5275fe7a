"""``fp8_128x128_ue8m0``: FP8 e4m3 128x128 blocks whose float32 scales are powers of two.

The DeepSeek-V3.1 / V4 checkpoint format (``"scale_fmt": "ue8m0"``) and what DeepGEMM's
Blackwell (SM100) kernels read: the same tensors as ``fp8_128x128`` — ``weight`` e4m3 ``(N, K)``,
``weight_scale_inv`` float32 ``(ceil(N/128), ceil(K/128))``, ``(E, …)`` for stacked experts,
edge blocks covering only their valid elements, blocks never crossing experts — but every scale
is a power of two, so it is exactly representable as a UE8M0 exponent byte.

Numerics, per block, all in float32 (CPU torch path, Triton interpreter and GPU kernel give the
same bits):

- ``amax`` = max |x| over the block's valid elements (exact: the source widened to float32);
- ``s = max(amax, MIN_AMAX) / 448`` with IEEE round-to-nearest division, ``MIN_AMAX`` the float32
  nearest 1e-4;
- ``scale = ceil_pow2(s)``, the smallest power of two >= ``s``, from the bits of ``s``: biased
  exponent ``e = (bits >> 23) & 0xFF``, plus one when any of the 23 mantissa bits is set, clamped
  to ``1..254``; ``scale`` has the bits ``e << 23``. (For every finite source the clamp never
  binds: ``s`` lies in ``[2^-22.1, 2^119.2]``, so ``scale`` in ``[2^-22, 2^120]``.) No float
  ``log2``, whose rounding near a power of two differs between libraries;
- ``q = e4m3(clamp(x / scale, -qmax, qmax))``, IEEE division (exact for a power of two unless the
  quotient is a float32 subnormal, which e4m3 rounds to zero anyway), round-to-nearest-even, with
  ``qmax = min(448, SATURATE / scale)`` and ``SATURATE = 15 * 2^124`` (1.875 * 2^127, the largest
  float32 with a 4-bit significand). ``qmax`` is 448 for every scale up to 2^119, i.e. for every
  block with ``amax <= 448 * 2^119 ~ 2.9e38``; only the scale 2^120 (amax up to float32's max) gets
  ``qmax = 240``, because there ``x / scale`` reaches 255.99, which rounds to 256 and ``256 * 2^120``
  is Inf: the bytes saturate to the largest finite ``q * scale`` instead, as the ±448 clamp does;
- an all-zero block gets ``scale = 2^-22`` and zero bytes; NaN or Inf anywhere is an error naming
  the source shape, never NaN bytes.

Checked against DeepGEMM's reference (github.com/deepseek-ai/DeepGEMM, ``deep_gemm/utils/math.py``
at 54e2261, June 2026): ``per_block_cast_to_fp8(x, use_ue8m0=True)`` zero-pads to 128 multiples,
takes ``x_amax = abs().float().amax(...).clamp(1e-4)``, ``sf = x_amax / 448.0``, then
``ceil_to_ue8m0(sf)``, which since 7f2a703 (April 2026) is the bit rule above (exponent field plus
"mantissa non-zero", clamped to 1..254; before that ``2 ** ceil(log2(sf))`` in float), and
quantizes with ``x * (1.0 / sf)`` and an unclamped cast. For power-of-two ``sf`` that product
equals our quotient, and ``x / sf`` never exceeds 448 (a float32 ``amax`` just above ``448 * 2^k``
gives a quotient at least 0.57 ulp above ``2^k``, which rounds up), so our bytes are DeepGEMM's on
the CPU except in blocks with amax > 2.9e38, where DeepGEMM writes 256 (Inf once dequantized) and
we write 240. (On CUDA DeepGEMM's ``x_amax / 448.0`` is a reciprocal multiply, which can move a
quotient that is exactly a power of two by an ulp and so double its scale; ours is IEEE.)
vLLM re-quantizes fp32 block checkpoints to these scales at load when DeepGEMM runs with E8M0
(``requant_weight_ue8m0_inplace`` via its copy of ``per_block_cast_to_fp8``, float ``log2`` form);
SGLang does the same (``requant_weight_ue8m0``) and then packs the exponents for its kernels —
a different layout, hence a different compile target than this raw fp32 grid.

Registered through its own entry point (``deepgemm_fp8_ue8m0``) of this distribution, so the
``deepgemm_fp8`` entry point keeps registering exactly ``fp8_128x128`` and its rules.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

import conversion_core as cc
from conversion_core.backend import use_triton
from conversion_core.formats.checkpoints import fp8_block_config, scale_target
from conversion_core.formats.config_keys import validate_hf_fp8
from conversion_core.formats.fp8 import E4M3, E4M3_MAX, is_dynamic_e4m3_fp8

from . import BLOCK, dequantize_blocks, scale_shape, statistic_block, torch_path

NAME = "fp8_128x128_ue8m0"
COMPILE_TARGET = "deep_gemm_fp8_ue8m0"
COMPILE_METADATA = {
    "block_size": list(BLOCK),
    "scale_layout": "blockwise",
    "dtype": "e4m3",
    "scale_fmt": "ue8m0",
    "scale_dtype": "float32",
}

#: DeepGEMM's amax floor, 1e-4, as the float32 it becomes (9.999999747378752e-05): written as that
#: exact value, so torch's scalar clamp and Triton's constant see the same number.
MIN_AMAX = 9.999999747378752e-05
assert MIN_AMAX == float(torch.tensor(1e-4, dtype=torch.float32))
#: 15 * 2^124: ``q * scale`` stays finite for every e4m3 ``|q| <= SATURATE / scale``.
SATURATE = 15.0 * 2.0**124
#: The smallest scale at which ``SATURATE / scale`` is below 448 (found by ``saturate_overflowing_blocks``).
SATURATING_SCALE = 2.0**120


def ceil_pow2(s: torch.Tensor) -> torch.Tensor:
    """The smallest power of two >= each element of positive float32 ``s``, by integer exponent arithmetic."""
    bits = s.view(torch.int32)
    exponent = ((bits >> 23) & 0xFF) + (bits & 0x7FFFFF).ne(0).to(torch.int32)
    return (exponent.clamp_(1, 254) << 23).view(torch.float32)


def scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """float32 power-of-two dequantization scale for a float32 ``amax`` (any shape).

    The torch path's scale step (``torch_path.quantize_blocks(..., scale_fn=scale_from_amax)``).
    Divides by a tensor: on CUDA ``t / number`` is ``t * (1 / number)``, not the IEEE quotient.
    """
    s = amax.clamp_min(MIN_AMAX).div_(torch.tensor(E4M3_MAX, dtype=amax.dtype, device=amax.device))
    return ceil_pow2(s)


def saturate_overflowing_blocks(out: torch.Tensor, scale_out: torch.Tensor) -> None:
    """Clamp the bytes of blocks whose ``qmax`` is below 448 to ``±SATURATE / scale`` (in place).

    Clamping the rounded ``q`` equals clamping ``x / scale`` before rounding: the limit is itself
    an e4m3 value, so nothing at or below it rounds past it. Only blocks with amax > 2.9e38 have
    such a scale, so this is one comparison over the scale grid for real weights.
    """
    flat_scale = scale_out.reshape(-1, *scale_out.shape[-2:])
    big = (flat_scale >= SATURATING_SCALE).nonzero().tolist()
    if not big:
        return
    q = out.view(-1, *out.shape[-2:])
    br, bc = BLOCK
    for e, i, j in big:
        block = q[e, i * br : (i + 1) * br, j * bc : (j + 1) * bc]
        limit = SATURATE / float(flat_scale[e, i, j])
        block.copy_(block.float().clamp_(-limit, limit))


def reference_quantize(src: torch.Tensor, out: torch.Tensor, scale_out: torch.Tensor) -> None:
    """The definition in one vectorised pass over float32 copies (the torch path's twin, for tests)."""
    torch_path.reference_quantize_blocks(src, out, scale_out, BLOCK, NAME, scale_fn=scale_from_amax)
    saturate_overflowing_blocks(out, scale_out)


def quantize(src: torch.Tensor, out: torch.Tensor, scale_out: torch.Tensor | None) -> None:
    assert scale_out is not None  # the core's checks guarantee it
    if use_triton(src):
        from . import triton_kernels

        triton_kernels.quantize_blocks(src, out, scale_out, BLOCK, NAME, ue8m0=True)
    else:
        torch_path.quantize_blocks(src, out, scale_out, BLOCK, NAME, scale_fn=scale_from_amax)
        saturate_overflowing_blocks(out, scale_out)


def launch(src: torch.Tensor, out: torch.Tensor, scale_out: torch.Tensor | None, flag: torch.Tensor) -> None:
    """Queue the Triton kernel, no host sync: sets ``flag[0]`` on NaN/Inf (the whole-model plan's step)."""
    assert scale_out is not None
    if src.numel():
        from . import triton_kernels

        triton_kernels.launch_blocks(src, out, scale_out, flag, BLOCK, ue8m0=True)


def launch_group(calls: Sequence[tuple[Any, ...]], flag: torch.Tensor) -> None:
    """``launch`` for a run of calls: one Triton launch per group of same-shaped sources."""
    from . import triton_kernels

    triton_kernels.launch_block_group(calls, flag, BLOCK, ue8m0=True)


def dequantize(q: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """float32 ``q * scale`` with each block's scale broadcast over its 128x128 elements."""
    return dequantize_blocks(q, scale, NAME)


def quantize_with_amax(
    x: torch.Tensor, amax: torch.Tensor, grid: torch.Tensor, out: torch.Tensor, scale_out: torch.Tensor
) -> None:
    """``BlockAmax.apply`` for a sharded source: the torch path's numerics from the global block amax.

    The per-element clamp to ``min(448, SATURATE / scale)`` equals the torch path's ±448 clamp
    followed by ``saturate_overflowing_blocks`` (the limit is itself an e4m3 value).
    """
    scale_out.copy_(scale_from_amax(grid).reshape(scale_out.shape))
    scale = scale_from_amax(amax)
    limit = torch.tensor(SATURATE, dtype=torch.float32, device=x.device).div(scale).clamp_(max=E4M3_MAX)
    q = torch.div(x.float(), scale)
    out.view(x.shape).copy_(torch.maximum(torch.minimum(q, limit), -limit))


def target_format(qc: dict[str, Any]) -> cc.TargetFormat:
    """DeepSeek-V3.1 ``fp8`` checkpoints with ``scale_fmt: "ue8m0"`` (``weight_scale_inv``)."""
    return scale_target(
        qc, "weight_scale_inv", per_row=False, written=lambda kept: fp8_block_config(BLOCK, kept, scale_fmt="ue8m0")
    )


FP8_128X128_UE8M0 = cc.Conversion(
    name=NAME,
    fn=quantize,
    requires_scale=True,
    dst_dtype=E4M3,
    scale_shape=scale_shape,
    scale_name="weight_scale_inv",
    compile_target=COMPILE_TARGET,
    compile_metadata=COMPILE_METADATA,
    dequantize=dequantize,
    src_ndims=(2, 3),
    launch=launch,
    launch_group=launch_group,
    target_format=target_format,
    sharded=cc.BlockAmax(block=statistic_block, apply=quantize_with_amax),
)


def is_fp8_block_128_ue8m0(qc: dict[str, Any]) -> bool:
    """HF ``fp8`` with ``weight_block_size: [128, 128]`` and ``scale_fmt: "ue8m0"`` (DeepSeek-V3.1, V4).

    Otherwise the guards of the float32-scale rule: ``fmt`` absent or e4m3, ``activation_scheme``
    absent or dynamic, ``expert_dtype`` absent or fp8, no unknown key.
    """
    if qc.get("scale_fmt") != "ue8m0" or qc.get("weight_block_size") != list(BLOCK):
        return False
    return is_dynamic_e4m3_fp8({key: value for key, value in qc.items() if key != "scale_fmt"})


@cc.hookimpl
def register_conversion() -> cc.Conversion:
    return FP8_128X128_UE8M0


@cc.hookimpl
def default_rule() -> list[cc.Rule]:
    return [
        cc.Rule(
            conversion=NAME,
            predicate=is_fp8_block_128_ue8m0,
            priority=200,
            name="fp8-block-128x128-ue8m0",
            validate=validate_hf_fp8,
        )
    ]
