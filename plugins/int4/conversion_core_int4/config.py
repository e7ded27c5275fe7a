"""Which compressed-tensors configs select an int4 W4A16 conversion, and what a checkpoint carries.

A config is ours when ``quant_method`` is ``compressed-tensors`` and a config group quantizes
weights to 4-bit ints (``num_bits: 4``, ``type: int``). Then every key must be one this plugin
honours, else the rule raises a one-line :class:`~conversion_core.ConfigError` naming the key
(``cc.explain`` shows it; the resolver counts it as no match, so such a config ends in the
no-match error instead of silently getting other bytes):

- ``format`` (top level and per group) ``pack-quantized``;
- weights: ``strategy: group``, ``group_size`` registered, ``symmetric`` a bool, ``dynamic`` false,
  ``actorder`` none or ``"weight"`` (``"group"`` needs ``g_idx``, which this plugin does not write),
  no ``block_structure``, ``scale_dtype`` none/bf16, ``zp_dtype`` none/int8, ``observer`` none or a
  min-max one (another observer chooses other scales than these bytes);
- no ``input_activations`` / ``output_activations`` (W4A8 and friends quantize activations with
  calibrated or dynamic scales of their own), no ``kv_cache_scheme``, no ``transform_config``
  (rotations), no ``sparsity_config``; every group with weights has the same weights args.

A converted checkpoint carries the ``--like`` config with the kept modules added to ``ignore``
(or, with the conversion named directly, the config ``model_free_ptq`` writes for the preset).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import conversion_core as cc
from conversion_core.formats.checkpoints import with_ignored
from conversion_core.formats.modules import module_keep

MINMAX_OBSERVERS = (None, "minmax", "memoryless_minmax", "static_minmax")
ACTORDERS = (None, False, "weight")


def _fail(key: str, value: Any, expected: str) -> cc.ConfigError:
    return cc.ConfigError(f"int4: quantization_config {key} is {value!r}; this plugin needs {expected}")


def _int4_groups(qc: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    groups = qc.get("config_groups")
    if not isinstance(groups, Mapping):
        return []
    found = []
    for gname, group in groups.items():
        weights = group.get("weights") if isinstance(group, Mapping) else None
        if isinstance(weights, Mapping) and weights.get("type") == "int" and weights.get("num_bits") is not None:
            found.append((str(gname), group))
    return found


def weights_args(qc: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The int weights args of a compressed-tensors config, None when it is not an int-weight config.

    Raises ConfigError for an int-weight config this plugin cannot honour.
    """
    if qc.get("quant_method") != "compressed-tensors":
        return None
    groups = _int4_groups(qc)
    if not groups:
        return None
    first_name, first = groups[0]
    for gname, group in groups:
        where = f"config_groups.{gname}"
        if group.get("weights") != first.get("weights"):
            raise _fail(f"{where}.weights", group.get("weights"), f"the same weights args as {first_name}")
        for key in ("input_activations", "output_activations"):
            if group.get(key) is not None:
                raise _fail(f"{where}.{key}", group.get(key), "null (W4A16 quantizes weights only)")
        if group.get("format") not in (None, "pack-quantized"):
            raise _fail(f"{where}.format", group.get("format"), "'pack-quantized'")
    if qc.get("format") not in (None, "pack-quantized"):
        raise _fail("format", qc.get("format"), "'pack-quantized'")
    for key in ("kv_cache_scheme", "transform_config", "sparsity_config"):
        if qc.get(key):
            raise _fail(key, qc.get(key), "none (this plugin writes plain int4 weights)")
    w = first["weights"]
    where = f"config_groups.{first_name}.weights"
    checks: list[tuple[str, bool, str]] = [
        ("num_bits", w.get("num_bits") == 4, "4"),
        ("strategy", w.get("strategy", "group") == "group", "'group'"),
        ("symmetric", isinstance(w.get("symmetric", True), bool), "true or false"),
        ("dynamic", w.get("dynamic", False) is False, "false (static weight scales)"),
        ("actorder", w.get("actorder") in ACTORDERS, "null or 'weight' ('group' needs g_idx, not written here)"),
        ("block_structure", w.get("block_structure") is None, "null"),
        ("scale_dtype", w.get("scale_dtype") in (None, "torch.bfloat16", "bfloat16"), "null or bfloat16"),
        ("zp_dtype", w.get("zp_dtype") in (None, "torch.int8", "int8"), "null or int8"),
        ("observer", w.get("observer") in MINMAX_OBSERVERS, "null or a min-max observer"),
    ]
    for key, ok, expected in checks:
        if not ok:
            raise _fail(f"{where}.{key}", w.get(key), expected)
    return w


def selects(group: int, symmetric: bool, registered: Sequence[int]) -> Callable[[dict[str, Any]], bool]:
    """The predicate of the rule for one conversion."""

    def predicate(qc: dict[str, Any]) -> bool:
        w = weights_args(qc)
        if w is None:
            return False
        size = w.get("group_size")
        if size not in registered:
            raise _fail("weights.group_size", size, f"one of {list(registered)}")
        return bool(size == group and w.get("symmetric", True) is symmetric)

    return predicate


def preset_config(group: int, symmetric: bool, ignored: Sequence[str]) -> dict[str, Any]:
    """The ``quantization_config`` llm-compressor 0.14 ``model_free_ptq`` writes for ``W4A16``(``_ASYM``)."""
    return {
        "config_groups": {
            "group_0": {
                "format": "pack-quantized",
                "input_activations": None,
                "output_activations": None,
                "targets": ["Linear"],
                "weights": {
                    "actorder": None,
                    "block_structure": None,
                    "dynamic": False,
                    "group_size": group,
                    "num_bits": 4,
                    "observer": None,
                    "observer_kwargs": {},
                    "scale_dtype": None,
                    "strategy": "group",
                    "symmetric": symmetric,
                    "type": "int",
                    "zp_dtype": None if symmetric else "torch.int8",
                },
            }
        },
        "format": "pack-quantized",
        "global_compression_ratio": None,
        "ignore": sorted(ignored),
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
    }


def target_format(qc: dict[str, Any], group: int, symmetric: bool) -> cc.TargetFormat:
    """Outputs under their compressed-tensors names; the config's targets/ignore decide what is kept."""
    if qc.get("quant_method") == "compressed-tensors":
        like = copy.deepcopy(qc)
        like["quantization_status"] = "compressed"
        return cc.TargetFormat(quantization_config=lambda kept: with_ignored(like, kept), keep=module_keep(qc))
    return cc.TargetFormat(quantization_config=lambda kept: preset_config(group, symmetric, kept))
