"""FP8 e4m3 numerics shared by every FP8 plugin, so all of them round the same way.

``scale = max(amax, 1e-12) / 448`` in float32 is the dequantization multiplier
(``w ≈ q * scale``; DeepGEMM/vLLM call it ``weight_scale_inv``), and
``q = e4m3(clamp(x / scale, -448, 448))`` with IEEE division and round-to-nearest-even.
"""

from __future__ import annotations

import torch

from .errors import ConversionInputError

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
MIN_AMAX = 1e-12


def scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """float32 dequantization scale for a float32 ``amax`` (any shape)."""
    return amax.clamp_min(MIN_AMAX).div_(E4M3_MAX)


def quantize_into(x: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> None:
    """``out = e4m3(clamp(x / scale, ±448))``; ``x`` float32, ``scale`` broadcastable to it."""
    q = torch.div(x, scale)
    out.copy_(q.clamp_(-E4M3_MAX, E4M3_MAX))


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


def is_dynamic_e4m3_fp8(qc: dict) -> bool:
    """An HF ``fp8`` quantization_config these float32-scale e4m3 bytes can serve.

    ``fmt`` absent or e4m3; ``scale_fmt`` absent or float32 (``ue8m0`` needs power-of-two
    scales); ``activation_scheme`` absent or dynamic (static needs input scales).
    """
    return (
        qc.get("quant_method") == "fp8"
        and qc.get("fmt") in (None, "e4m3")
        and qc.get("scale_fmt") in (None, "float32", "fp32")
        and qc.get("activation_scheme") in (None, "dynamic")
    )


def compressed_tensors_fp8_weights(qc: dict) -> dict | None:
    """The weight quantization args of a compressed-tensors FP8 config, or None.

    Returns the ``weights`` dict shared by every config group when all groups quantize
    weights to 8-bit float, symmetric and static, with activations absent or dynamic;
    None for anything else (int formats, static activations, disagreeing groups).
    """
    if qc.get("quant_method") != "compressed-tensors":
        return None
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        return None
    shared = None
    for group in groups.values():
        if not isinstance(group, dict):
            return None
        weights, acts = group.get("weights"), group.get("input_activations")
        if group.get("format", qc.get("format")) not in (None, "float-quantized"):
            return None
        if not isinstance(weights, dict) or weights.get("type") != "float" or weights.get("num_bits") != 8:
            return None
        if weights.get("dynamic") not in (None, False) or weights.get("symmetric") not in (None, True):
            return None
        if acts is not None and not (isinstance(acts, dict) and acts.get("dynamic") is True):
            return None
        if shared is not None and weights != shared:
            return None
        shared = weights
    return shared
