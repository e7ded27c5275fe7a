"""Checkpoint conventions several plugins write: HF ``fp8``, compressed-tensors, fbgemm.

What the plugins' ``target_format`` functions share: the ``quantization_config`` each family of
checkpoint carries, how it lists the modules left unquantized, and how it names and shapes scales
(compressed-tensors and fbgemm call every scale ``weight_scale`` and store per-row scales
``(N, 1)``; DeepSeek-style ``fp8`` keeps the conversion's own scale name).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..contract import TargetFormat
from ..errors import ConfigError
from .modules import module_keep

Shape = tuple[int, ...]

#: Per quantization method, the keys that list modules a checkpoint leaves unquantized.
IGNORE_KEYS: dict[str, tuple[str, ...]] = {
    "fp8": ("ignored_layers", "modules_to_not_convert"),
    "compressed-tensors": ("ignore",),
    "fbgemm_fp8": ("modules_to_not_convert",),
}
#: Methods whose checkpoints name every scale ``weight_scale`` and store per-row scales (N, 1).
WEIGHT_SCALE_METHODS = ("compressed-tensors", "fbgemm_fp8")
#: Every key that lists modules to leave unquantized, in any family.
_ALL_IGNORE_KEYS = ("modules_to_not_convert", "ignored_layers", "ignore")


def fp8_block_config(block: Sequence[int], ignored: Sequence[str], **extra: Any) -> dict[str, Any]:
    """DeepSeek-V3 / Qwen3 FP8 style, read by vLLM's ``fp8`` method (``weight_scale_inv`` scales)."""
    qc: dict[str, Any] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(block),
        **extra,
    }
    if ignored:
        qc["ignored_layers"] = list(ignored)
        qc["modules_to_not_convert"] = list(ignored)  # transformers' spelling of the same list
    return qc


def compressed_tensors_fp8_config(strategy: str, ignored: Sequence[str]) -> dict[str, Any]:
    """compressed-tensors ``float-quantized`` FP8 weights of ``strategy`` (``channel``, ``tensor``),
    dynamic per-token activations."""
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "format": "float-quantized",
                "weights": {
                    "num_bits": 8,
                    "type": "float",
                    "strategy": strategy,
                    "symmetric": True,
                    "dynamic": False,
                    "group_size": None,
                    "block_structure": None,
                    "actorder": None,
                    "observer": "minmax",
                },
                "input_activations": {
                    "num_bits": 8,
                    "type": "float",
                    "strategy": "token",
                    "symmetric": True,
                    "dynamic": True,
                    "group_size": None,
                    "observer": None,
                },
                "output_activations": None,
            }
        },
        "ignore": list(ignored),
        "kv_cache_scheme": None,
        "sparsity_config": {},
    }


def with_ignored(qc: Mapping[str, Any], ignored: Sequence[str]) -> dict[str, Any]:
    """``qc`` with the kept modules added to its own ignore list(s)."""
    out = copy.deepcopy(dict(qc))
    for key in IGNORE_KEYS.get(str(qc.get("quant_method")), ()):
        existing = list(out.get(key) or [])
        out[key] = existing + [m for m in ignored if m not in existing]
    return out


def ignore_patterns(qc: Mapping[str, Any]) -> list[str]:
    """Every module the config says to leave unquantized, in the config's own spelling."""
    patterns: list[str] = []
    for key in _ALL_IGNORE_KEYS:
        value = qc.get(key)
        if value is None:
            continue
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"quantization_config[{key!r}] must be a list of module names, got {value!r}")
        patterns.extend(value)
    return patterns


def _module_candidates(name: str) -> list[str]:
    parts = name.split(".")
    return [name, ".".join(parts[:-1])] if len(parts) > 1 else [name]


def matches_module(pattern: str, name: str) -> bool:
    """Whether a config's ignore entry names the module holding tensor ``name``.

    ``re:<regex>`` is matched from the start (as compressed-tensors and vLLM do) against the
    module and the tensor name; a plain entry matches a run of whole dotted components, so
    ``lm_head``, ``mlp.gate`` and ``model.layers.0.mlp.gate`` match, but ``gate`` never matches
    ``gate_proj``.
    """
    if pattern.startswith("re:"):
        try:
            regex = re.compile(pattern[3:])
        except re.error as exc:
            raise ConfigError(f"ignore pattern {pattern!r} is not a valid regular expression: {exc}") from exc
        return any(regex.match(c) for c in _module_candidates(name))
    if not pattern:
        return False
    return any(c == pattern or f".{c}.".find(f".{pattern}.") >= 0 for c in _module_candidates(name))


def ignored_by(qc: Mapping[str, Any]) -> Callable[[str], str | None]:
    """Tensor name -> ``"ignored by config: <entry>"`` when the config's ignore lists name its module."""
    patterns = ignore_patterns(qc)

    def keep(name: str) -> str | None:
        for pattern in patterns:
            if matches_module(pattern, name):
                return f"ignored by config: {pattern}"
        return None

    return keep


def scale_target(
    qc: Mapping[str, Any],
    default_scale_name: str,
    per_row: bool,
    written: Callable[[list[str]], dict[str, Any] | None],
) -> TargetFormat:
    """The target format of a one-scale conversion for the checkpoint family ``qc`` names.

    compressed-tensors / fbgemm configs: scale ``weight_scale``, per-row scales ``(N, 1)``, the
    config written back with the kept modules in its ignore list. Any other config (or none): the
    conversion's own scale name, the config ``written(kept)`` gives. Which modules the config
    keeps follows the engines' own matching (:mod:`conversion_core.formats.modules`).
    """
    keep = module_keep(qc) if qc else None
    if qc.get("quant_method") in WEIGHT_SCALE_METHODS:
        like = dict(qc)
        return TargetFormat(
            output_names=("weight", "weight_scale"),
            stored_shape=(lambda i, shape: (*shape, 1) if i == 1 else shape) if per_row else None,
            quantization_config=lambda kept: with_ignored(like, kept),
            keep=keep,
        )
    return TargetFormat(output_names=("weight", default_scale_name), quantization_config=written, keep=keep)
