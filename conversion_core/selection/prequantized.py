"""Refuse a source that some tool already quantized: it would otherwise pass as unquantized weights.

A quantized checkpoint read as if it were bf16 does not crash: its packed integer words are kept
as "non-float tensors", its scales are cast or quantized again as if they were weights, and the
converted checkpoint loads and generates garbage. So every source is checked for the markers real
quantized checkpoints carry, and the first one found is an error naming the file or tensor and
the marker:

- the model's ``config.json`` has a ``quantization_config`` (transformers' convention, every
  quantizer) or a ``compression_config`` (older llm-compressor checkpoints);
- a quantizer's own config file sits beside the weights (:data:`CONFIG_FILES`);
- a tensor is named as a quantizer stores its companions (:data:`COMPANION_NAMES`): packed words,
  zero points and group indices of the packed-integer formats, a weight's or an activation's scale,
  a packed weight, the unpacked shape, per-weight quantization state stored under the weight;
- a tensor named ``weight`` is stored in an integer dtype or a one-byte float: trainers hold
  weights in 16- or 32-bit floats.

The rules read names and dtypes only (headers, meta tensors), so they run before any byte is
converted. They are about what other tools write, not about a format the core converts.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import ConversionInputError

#: Files a quantizer writes beside the weights, and who writes them.
CONFIG_FILES = {
    "quantize_config.json": "a GPTQ quantize_config.json",
    "quant_config.json": "an AWQ quant_config.json",
    "hf_quant_config.json": "the hf_quant_config.json of NVIDIA Model Optimizer",
}

#: Keys of config.json that say the weights are quantized.
CONFIG_KEYS = ("quantization_config", "compression_config")

#: A tensor name (its end) a quantizer uses for what it stores next to, or instead of, a weight.
COMPANION_NAMES = re.compile(
    r"(^|\.)("
    r"qweight|qzeros|scales|g_idx|SCB"  # packed integer weights (GPTQ, AWQ, exllama) and int8 row scales
    r"|(weight|input|output|k|v|q)_(scale|scale_inv|scale_\d+|global_scale|zero_point)"  # scales, zero points
    r"|weight_(packed|shape|g_idx)"  # a packed weight and its unpacked shape, per-weight group indices
    r")$"
    r"|\.weight\.(absmax|quant_map|nested_absmax|nested_quant_map|quant_state\..+|_data|_scale)$"  # state under it
)
#: A weight proper (not ``weight_g``/``weight_v`` of weight norm, nor a parametrization's original).
WEIGHT_NAME = re.compile(r"(^|\.)weight$")


def tensor_marker(name: str, dtype: torch.dtype) -> str | None:
    """What marks tensor ``name`` of ``dtype`` as already quantized, or None."""
    match = COMPANION_NAMES.search(name)
    if match:
        return f"{match.group(0).lstrip('.')!r} is a name quantizers store their packed weights or scales under"
    if WEIGHT_NAME.search(name) and (not dtype.is_floating_point or dtype.itemsize < 2):
        return f"a weight stored as {str(dtype).removeprefix('torch.')}, not a 16- or 32-bit float"
    return None


def refuse_quantized_tensors(
    tensors: Iterable[tuple[str, torch.dtype]], where: Mapping[str, str] | None = None
) -> None:
    """Raise naming the first tensor that is a quantizer's output; ``where`` maps a name to its file."""
    for name, dtype in tensors:
        marker = tensor_marker(name, dtype)
        if marker is not None:
            place = f"{where[name]}: " if where and name in where else ""
            raise ConversionInputError(
                f"{place}tensor {name!r} is already quantized ({marker}); "
                "conversions read unquantized weights (bf16, fp16 or fp32)"
            )


def refuse_quantized_source(
    src: Path, config: Mapping[str, Any], tensors: Iterable[tuple[str, torch.dtype]], where: Mapping[str, str]
) -> None:
    """Refuse a checkpoint directory whose config, files or tensors say it is already quantized."""
    for key in CONFIG_KEYS:
        if config.get(key):
            raise ConversionInputError(
                f"{src / 'config.json'} already has a {key}: the checkpoint is already quantized; "
                "convert reads unquantized checkpoints (bf16, fp16 or fp32 weights)"
            )
    for file, who in CONFIG_FILES.items():
        if (src / file).exists():
            raise ConversionInputError(
                f"{src / file} exists ({who}): the checkpoint is already quantized; "
                "convert reads unquantized checkpoints (bf16, fp16 or fp32 weights)"
            )
    refuse_quantized_tensors(tensors, where)


__all__ = [
    "COMPANION_NAMES",
    "CONFIG_FILES",
    "CONFIG_KEYS",
    "refuse_quantized_source",
    "refuse_quantized_tensors",
    "tensor_marker",
]
