"""FP8 e4m3 numerics shared by every FP8 plugin, so all of them round the same way.

``scale = max(amax, 1e-12) / 448`` in float32 is the dequantization multiplier
(``w ≈ q * scale``; DeepGEMM/vLLM call it ``weight_scale_inv``), and
``q = e4m3(clamp(x / scale, -448, 448))`` with IEEE division and round-to-nearest-even.
"""

from __future__ import annotations

import torch

from ..errors import ConversionInputError

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
MIN_AMAX = 1e-12

# Float bits with the sign masked off order like the magnitudes, with Inf above every finite value
# and NaN above Inf: an integer max over them is an exact abs-max that cannot drop a NaN.
# dtype -> (same-size int dtype, mask clearing the sign, bits of +Inf)
ABS_BITS: dict[torch.dtype, tuple[torch.dtype, int, int]] = {
    torch.bfloat16: (torch.int16, 0x7FFF, 0x7F80),
    torch.float16: (torch.int16, 0x7FFF, 0x7C00),
    torch.float32: (torch.int32, 0x7FFFFFFF, 0x7F800000),
}


def scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """float32 dequantization scale for a float32 ``amax`` (any shape).

    Divides by a tensor, not a Python number: on CUDA torch turns ``t / number`` (and ``t / cpu
    scalar tensor``) into ``t * (1 / number)``, which is not the IEEE quotient the CPU (and the
    Triton kernels) give. The divisor is made on ``amax``'s device by a fill, not copied from the
    host, so the function can be captured in a CUDA graph (a plugin's torch-only ``launch``).
    """
    return amax.clamp_min(MIN_AMAX).div_(amax.new_full((), E4M3_MAX))


def abs_bits_into(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = bits(|x|)`` as ``ABS_BITS[x.dtype]``'s int dtype; ``x`` may have any strides."""
    int_dtype, mask, _ = ABS_BITS[x.dtype]
    return torch.bitwise_and(x.view(int_dtype), mask, out=out)


def amax_from_abs_bits(bits: torch.Tensor, dtype: torch.dtype, conversion: str, shape: torch.Size) -> torch.Tensor:
    """float32 abs-max from max-reduced ``abs_bits_into`` values; raises if any is NaN or Inf."""
    if bool((bits >= ABS_BITS[dtype][2]).any()):
        raise non_finite_error(conversion, shape)
    return bits.view(dtype).float()


def quantize_into(x: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> None:
    """``out = e4m3(clamp(x / scale, ±448))``; ``x`` float32, ``scale`` broadcastable to it."""
    q = torch.div(x, scale)
    out.copy_(q.clamp_(-E4M3_MAX, E4M3_MAX))


def quantize_chunk_into(
    x: torch.Tensor, scale: torch.Tensor, scratch: torch.Tensor, out: torch.Tensor, clamp: bool = True
) -> None:
    """``quantize_into`` for one cache-sized chunk, through the float32 ``scratch`` (``x``'s shape).

    The same float32 ``x / scale`` (IEEE division: exact widening, then torch's float32 division),
    clamp and cast, with no allocation. ``clamp=False`` skips the clamp, a pass of its own, where
    the caller's scale is :func:`scale_from_amax` of an amax that bounds ``|x|``: see
    :data:`UNCLAMPED_BOUND`.
    """
    if x.dtype == torch.float32:
        torch.div(x, scale, out=scratch)
    else:
        scratch.copy_(x)
        scratch.div_(scale)
    out.copy_(scratch.clamp_(-E4M3_MAX, E4M3_MAX) if clamp else scratch)


#: Why ``clamp(x / scale, ±448)`` casts like ``x / scale`` when ``scale = scale_from_amax(amax)`` and
#: ``|x| <= amax``: ``scale >= (amax / 448)(1 - 2**-24)`` (one IEEE rounding; for ``amax < 1e-12``
#: the quotient is even smaller), so ``|fl(x / scale)| <= 448 (1 + 2**-24) / (1 - 2**-24) < 448.0001``,
#: and torch's e4m3fn cast rounds everything in ``(448, 464)`` to 448, the clamp's value
#: (``tests/test_fp8_unclamped.py`` checks the cast there and the bytes of both forms).
UNCLAMPED_BOUND = E4M3_MAX * (1 + 2.0**-24) / (1 - 2.0**-24)


def non_finite_error(conversion: str, shape: torch.Size | tuple[int, ...]) -> ConversionInputError:
    return ConversionInputError(
        f"conversion {conversion!r}: source tensor of shape {tuple(shape)} holds NaN or Inf; "
        "refusing to write FP8 bytes (fix the weights, e.g. check the training step for divergence)"
    )


def check_fp8_dequantize_args(q: torch.Tensor, scale: torch.Tensor | None, conversion: str) -> torch.Tensor:
    if scale is None:
        raise ConversionInputError(f"conversion {conversion!r}: dequantize needs the scale tensor")
    if q.dtype != E4M3:
        raise ConversionInputError(f"conversion {conversion!r}: dequantize expects float8_e4m3fn, got {q.dtype}")
    return scale


#: ``scale_fmt`` values that mean plain float32 scales (transformers writes ``"float"``).
FLOAT32_SCALE_FMTS = (None, "float", "float32", "fp32")

#: Every key of an HF ``fp8`` quantization_config whose meaning is known not to change the
#: weight bytes beyond what the guards check. An unknown key might (DeepSeek-V4's
#: ``expert_dtype`` switched the experts to FP4), so a config with one matches no FP8 rule.
FP8_CONFIG_KEYS = frozenset(
    {
        "quant_method",
        "fmt",
        "activation_scheme",
        "weight_block_size",
        "scale_fmt",
        "expert_dtype",
        "quant_format",
        "modules_to_not_convert",
        "ignored_layers",
        "modules_to_convert",
        "dequantize",
    }
)

#: Keys of transformers' ``fbgemm_fp8`` config (per-channel weights, dynamic per-token activations).
FBGEMM_FP8_CONFIG_KEYS = frozenset({"quant_method", "activation_scale_ub", "modules_to_not_convert"})


def is_dynamic_e4m3_fp8(qc: dict) -> bool:
    """An HF ``fp8`` quantization_config these float32-scale e4m3 bytes can serve.

    ``fmt`` absent or e4m3; ``scale_fmt`` absent or float32 (``ue8m0`` needs power-of-two
    scales); ``activation_scheme`` absent or dynamic (static needs input scales);
    ``expert_dtype`` absent or fp8 (``fp4`` experts are another format); no unknown key.
    """
    return (
        qc.get("quant_method") == "fp8"
        and all(key in FP8_CONFIG_KEYS for key in qc)
        and qc.get("fmt") in (None, "e4m3")
        and qc.get("scale_fmt") in FLOAT32_SCALE_FMTS
        and qc.get("activation_scheme") in (None, "dynamic")
        and qc.get("expert_dtype") in (None, "fp8")
    )


def is_fbgemm_fp8_config(qc: dict) -> bool:
    """transformers' ``fbgemm_fp8``: e4m3 weights with one float32 scale per output row."""
    return qc.get("quant_method") == "fbgemm_fp8" and all(key in FBGEMM_FP8_CONFIG_KEYS for key in qc)


def compressed_tensors_fp8_weights(qc: dict) -> dict | None:
    """The weight quantization args of a compressed-tensors FP8 config, or None.

    Returns the ``weights`` dict shared by every config group when all groups are
    ``float-quantized`` 8-bit float weights, symmetric, static, with float32 scales and no
    group size or activation ordering, activations absent or dynamic 8-bit float, and no
    output activations; the checkpoint must be ``compressed`` with no sparsity and no
    transform (rotated weights need more than a cast). None for anything else (int or
    4-bit formats, static activations, disagreeing groups, ...).
    """
    if qc.get("quant_method") != "compressed-tensors":
        return None
    if qc.get("quantization_status") not in (None, "compressed"):
        return None
    if qc.get("sparsity_config") or qc.get("transform_config"):
        return None
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        return None
    shared = None
    for group in groups.values():
        if not isinstance(group, dict):
            return None
        weights, acts = group.get("weights"), group.get("input_activations")
        if (group.get("format") or qc.get("format")) != "float-quantized":
            return None
        if not _is_fp8_static_weights(weights) or not _is_dynamic_fp8_activations(acts):
            return None
        if group.get("output_activations") is not None:
            return None
        if shared is not None and weights != shared:
            return None
        shared = weights
    return shared


def _is_fp8_static_weights(weights: object) -> bool:
    return (
        isinstance(weights, dict)
        and weights.get("type") == "float"
        and weights.get("num_bits") == 8
        and weights.get("symmetric", True) is True
        and weights.get("dynamic", False) is False
        and weights.get("group_size") is None
        and weights.get("actorder") is None
        and weights.get("scale_dtype") in (None, "float32", "torch.float32")
        and weights.get("zp_dtype") is None
    )


def _is_dynamic_fp8_activations(acts: object) -> bool:
    """Absent (weight-only) or computed at run time: no input scales to ship."""
    if acts is None:
        return True
    return (
        isinstance(acts, dict)
        and acts.get("dynamic") is True
        and acts.get("type", "float") == "float"
        and acts.get("num_bits", 8) == 8
    )


def quantize_with_amax(
    x: torch.Tensor, amax: torch.Tensor, grid: torch.Tensor, out: torch.Tensor, scale_out: torch.Tensor
) -> None:
    """``BlockAmax.apply`` of the one-scale FP8 conversions (a sharded source's local shard).

    ``amax`` is each element's block amax (global, reduced across ranks), ``grid`` the amax grid
    laid out like ``scale_out``: the same ``scale_from_amax`` and ``quantize_into`` as the
    unsharded torch paths, so the bytes are identical.
    """
    scale_out.copy_(scale_from_amax(grid).reshape(scale_out.shape))
    quantize_into(x.float(), scale_from_amax(amax), out.view(x.shape))
