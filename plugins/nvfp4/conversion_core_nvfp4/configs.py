"""Which ``quantization_config`` selects NVFP4, what a converted checkpoint carries, what is refused.

compressed-tensors: every config group ``nvfp4-pack-quantized`` with the ``NVFP4A16`` weights
(``num_bits 4, type float, strategy tensor_group, group_size 16, symmetric, static,
scale_dtype float8_e4m3fn``) and no input activations: the ``NVFP4`` scheme's activations carry a
calibrated ``input_global_scale`` that a weight conversion cannot produce, so it is refused
(also by llm-compressor's ``model_free_ptq``). ModelOpt: ``quant_method: modelopt`` with
``quant_algo: NVFP4`` and ``group_size: 16``, in config.json or as ``hf_quant_config.json``'s
``{"producer": {"name": "modelopt"}, "quantization": {...}}``; its ``input_scale`` tensors are the
engine's own (calibrated once, not refit), so only the weights are written.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Mapping
from typing import Any

import conversion_core as cc
from conversion_core.formats.fused import fused_sets
from conversion_core.formats.modules import module_keep, module_of

FORMAT = "nvfp4-pack-quantized"
GROUP = 16
#: The ``weights`` args llm-compressor writes for ``NVFP4A16`` (compressed-tensors 0.19).
WEIGHTS: dict[str, Any] = {
    "num_bits": 4,
    "type": "float",
    "strategy": "tensor_group",
    "group_size": GROUP,
    "symmetric": True,
    "dynamic": False,
    "scale_dtype": "torch.float8_e4m3fn",
    "zp_dtype": None,
    "actorder": None,
    "block_structure": None,
    "observer": None,
    "observer_kwargs": {},
}


def _ct_problem(qc: Mapping[str, Any]) -> str | None:
    """Why a compressed-tensors config is not NVFP4A16 as this plugin writes it, or None."""
    if qc.get("quant_method") != "compressed-tensors":
        return f"quant_method is {qc.get('quant_method')!r}, not 'compressed-tensors'"
    if qc.get("quantization_status") not in (None, "compressed"):
        return f"quantization_status {qc.get('quantization_status')!r} (expected 'compressed')"
    if qc.get("sparsity_config") or qc.get("transform_config"):
        return "sparsity_config/transform_config are set (sparse or rotated weights)"
    groups = qc.get("config_groups")
    if not isinstance(groups, Mapping) or not groups:
        return "config_groups is missing or empty"
    for name, group in groups.items():
        if not isinstance(group, Mapping):
            return f"config_groups[{name!r}] is not a mapping"
        fmt = group.get("format") or qc.get("format")
        if fmt != FORMAT:
            return f"config_groups[{name!r}] format is {fmt!r}, not {FORMAT!r}"
        w = group.get("weights")
        if not isinstance(w, Mapping):
            return f"config_groups[{name!r}].weights is missing"
        for key in ("num_bits", "type", "strategy", "group_size", "symmetric"):
            if w.get(key) != WEIGHTS[key]:
                return f"config_groups[{name!r}].weights.{key} is {w.get(key)!r}, expected {WEIGHTS[key]!r}"
        if w.get("dynamic") not in (False, None) or w.get("actorder") not in (None, False):
            return f"config_groups[{name!r}].weights: dynamic/actorder weights are not NVFP4A16"
        if w.get("scale_dtype") not in (None, "torch.float8_e4m3fn", "float8_e4m3fn"):
            return f"config_groups[{name!r}].weights.scale_dtype is {w.get('scale_dtype')!r}, expected float8_e4m3fn"
        if group.get("input_activations") is not None:
            return (
                f"config_groups[{name!r}].input_activations is set: NVFP4 (W4A4) needs a calibrated "
                "input_global_scale, which a weight conversion cannot produce (use NVFP4A16)"
            )
        if group.get("output_activations") is not None:
            return f"config_groups[{name!r}].output_activations is set"
    if qc.get("kv_cache_scheme") is not None:
        return "kv_cache_scheme is set (calibrated k/v scales)"
    return None


def is_compressed_tensors_nvfp4(qc: dict[str, Any]) -> bool:
    """compressed-tensors ``nvfp4-pack-quantized`` with NVFP4A16 weights (see the module docstring)."""
    return _ct_problem(qc) is None


def modelopt_section(qc: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The ModelOpt quantization dict: config.json's own, or hf_quant_config.json's ``quantization``."""
    if qc.get("quant_method") == "modelopt":
        inner = qc.get("quantization")
        return inner if isinstance(inner, Mapping) else qc
    producer = qc.get("producer")
    if (
        isinstance(producer, Mapping)
        and producer.get("name") == "modelopt"
        and isinstance(qc.get("quantization"), Mapping)
    ):
        return qc["quantization"]  # type: ignore[no-any-return]
    return None


def _modelopt_problem(qc: Mapping[str, Any]) -> str | None:
    section = modelopt_section(qc)
    if section is None:
        return "not a ModelOpt config (quant_method 'modelopt' or producer.name 'modelopt')"
    if section.get("quant_algo") != "NVFP4":
        return f"quant_algo is {section.get('quant_algo')!r}, not 'NVFP4'"
    if section.get("group_size", GROUP) != GROUP:
        return f"group_size is {section.get('group_size')!r}; NVFP4 is defined for 16"
    return None


def is_modelopt_nvfp4(qc: dict[str, Any]) -> bool:
    return _modelopt_problem(qc) is None


def _refuse(what: str, why: str) -> cc.ConfigError:
    return cc.ConfigError(f"conversion {what!r} cannot write this quantization_config: {why}")


def written_ct_config(like: Mapping[str, Any] | None, kept: list[str]) -> dict[str, Any]:
    """The ``quantization_config`` of a converted checkpoint: llm-compressor's NVFP4A16 config, or
    ``like`` with the kept modules added to its ``ignore``."""
    if like:
        qc = copy.deepcopy(dict(like))
    else:
        qc = {
            "config_groups": {
                "NVFP4A16": {
                    "targets": ["Linear"],
                    "weights": dict(WEIGHTS),
                    "input_activations": None,
                    "output_activations": None,
                    "format": FORMAT,
                }
            },
            "format": FORMAT,
            "global_compression_ratio": None,
            "ignore": [],
            "kv_cache_scheme": None,
            "quant_method": "compressed-tensors",
            "quantization_status": "compressed",
            "transform_config": {},
        }
    ignore = list(qc.get("ignore") or [])
    qc["ignore"] = ignore + [m for m in kept if m not in ignore]
    return qc


def compressed_tensors_target(qc: dict[str, Any]) -> cc.TargetFormat:
    """compressed-tensors names (``weight_packed``, ``weight_scale``, ``weight_global_scale``) and
    llm-compressor's fused sets; a config it cannot honour is refused naming the key."""
    like = None
    keep = None
    if qc:
        problem = _ct_problem(qc)
        if problem is not None:
            raise _refuse("nvfp4", problem)
        like, keep = dict(qc), module_keep(qc)
    return cc.TargetFormat(
        output_names=("weight_packed", "weight_scale", "weight_global_scale"),
        quantization_config=lambda kept: written_ct_config(like, kept),
        keep=keep,
        shared_sets=fused_sets,
    )


def modelopt_keep(qc: Mapping[str, Any]) -> Any:
    """``exclude_modules`` (ModelOpt wildcards, ``fnmatch``) or ``ignore``, on the module name."""
    section = modelopt_section(qc) or {}
    patterns = list(section.get("exclude_modules") or qc.get("exclude_modules") or qc.get("ignore") or [])
    if not all(isinstance(p, str) for p in patterns):
        raise cc.ConfigError(f"quantization_config exclude_modules must be a list of module names, got {patterns!r}")

    def keep(tensor_name: str) -> str | None:
        module = module_of(tensor_name)
        for p in patterns:
            if fnmatch.fnmatchcase(module, p) or module == p:
                return f"excluded by config: exclude_modules {p!r}"
        return None

    return keep


def written_modelopt_config(like: Mapping[str, Any] | None, kept: list[str]) -> dict[str, Any]:
    section = dict(modelopt_section(like) or {}) if like else {}
    excluded = list(section.get("exclude_modules") or [])
    return {
        "quant_method": "modelopt",
        "quant_algo": "NVFP4",
        "group_size": GROUP,
        "kv_cache_quant_algo": section.get("kv_cache_quant_algo"),
        "exclude_modules": excluded + [m for m in kept if m not in excluded],
    }


def modelopt_target(qc: dict[str, Any]) -> cc.TargetFormat:
    """ModelOpt names (``weight``, ``weight_scale``, ``weight_scale_2``), the same fused sets."""
    like = None
    keep = None
    if qc:
        problem = _modelopt_problem(qc)
        if problem is not None:
            raise _refuse("nvfp4_modelopt", problem)
        like, keep = dict(qc), modelopt_keep(qc)
    return cc.TargetFormat(
        output_names=("weight", "weight_scale", "weight_scale_2"),
        quantization_config=lambda kept: written_modelopt_config(like, kept),
        keep=keep,
        shared_sets=fused_sets,
    )
