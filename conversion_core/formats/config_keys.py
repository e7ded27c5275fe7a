"""Validation of the Hugging Face ``quantization_config`` keys the built-in FP8 rules read.

The core checks only what every format shares (a mapping with a non-empty ``quant_method``);
which other keys matter, and what shape they must have, belongs to the rules that read them.
These helpers are what such rules pass as :attr:`conversion_core.Rule.validate`: each raises a
:class:`~conversion_core.errors.ConfigError` naming the key and what was expected, so a malformed
config is refused in one line instead of silently matching nothing. A key that is absent (or
``None``) is always fine: the predicates decide what its absence means.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..errors import ConfigError

ORIGIN = "quantization_config"

#: Keys the FP8 rules read as strings when present.
FP8_STRING_KEYS = ("fmt", "scale_fmt", "activation_scheme", "quant_format", "expert_dtype")
#: Keys the compressed-tensors rules read as strings when present.
COMPRESSED_TENSORS_STRING_KEYS = ("format",)
#: Keys listing modules left unquantized (HF fp8 / fbgemm / compressed-tensors spellings), or the
#: ones converted (``modules_to_convert``, which the target formats refuse with a message).
MODULE_LIST_KEYS = ("modules_to_not_convert", "ignored_layers", "ignore", "modules_to_convert")

Validator = Callable[[dict[str, Any]], None]


def check_block_size(qc: dict[str, Any]) -> None:
    """``weight_block_size``: a list of two positive ints ``[rows, cols]``."""
    block = qc.get("weight_block_size")
    if block is not None and not (
        isinstance(block, list)
        and len(block) == 2
        and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
    ):
        raise ConfigError(
            f"{ORIGIN}['weight_block_size'] must be a list of two positive ints [rows, cols], got {block!r}"
        )


def check_strings(keys: Sequence[str]) -> Validator:
    """A validator: each of ``keys``, when present, is a string."""

    def check(qc: dict[str, Any]) -> None:
        for key in keys:
            value = qc.get(key)
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"{ORIGIN}[{key!r}] must be a string, got {value!r}")

    return check


def check_module_lists(qc: dict[str, Any]) -> None:
    """Every module-list key, when present, is a list of module names (strings)."""
    for key in MODULE_LIST_KEYS:
        value = qc.get(key)
        if value is not None and not (isinstance(value, list) and all(isinstance(m, str) for m in value)):
            raise ConfigError(f"{ORIGIN}[{key!r}] must be a list of module names (strings) or null, got {value!r}")


def check_config_groups(qc: dict[str, Any]) -> None:
    """``config_groups``: a mapping of group name to a mapping (a compressed-tensors scheme)."""
    groups = qc.get("config_groups")
    if groups is None:
        return
    if not isinstance(groups, dict):
        raise ConfigError(
            f"{ORIGIN}['config_groups'] must be a mapping of group name to scheme, got {type(groups).__name__}"
        )
    for name, group in groups.items():
        if not isinstance(group, dict):
            raise ConfigError(
                f"{ORIGIN}['config_groups'][{name!r}] must be a mapping with 'weights' and "
                f"'input_activations', got {type(group).__name__}"
            )


def all_of(*checks: Validator) -> Validator:
    """One validator running ``checks`` in order."""

    def check(qc: dict[str, Any]) -> None:
        for one in checks:
            one(qc)

    return check


#: What an HF ``fp8`` / ``fbgemm_fp8`` rule passes as ``validate``: the keys those rules read.
validate_hf_fp8 = all_of(check_block_size, check_strings(FP8_STRING_KEYS), check_module_lists)
#: What a compressed-tensors rule passes as ``validate``.
validate_compressed_tensors = all_of(
    check_strings(COMPRESSED_TENSORS_STRING_KEYS), check_module_lists, check_config_groups
)

__all__ = [
    "FP8_STRING_KEYS",
    "MODULE_LIST_KEYS",
    "all_of",
    "check_block_size",
    "check_config_groups",
    "check_module_lists",
    "check_strings",
    "validate_compressed_tensors",
    "validate_hf_fp8",
]
