"""compressed-tensors MX configs: which ones these conversions serve, and the config a checkpoint carries.

Read from llm-compressor 0.14 / compressed-tensors 0.19 (``quantization/quant_scheme.py`` presets
``MXFP8`` / ``MXFP4``; ``compressors/mxfp8/base.py`` ``MXFP8QuantizationCompressor.can_compress``
and ``compressors/mxfp4/base.py`` ``MXFP4PackedCompressor.can_compress``: float weights of 8 or
4 bits, group size 32, uint8 scales). A config that names an MX format but asks for something
these bytes do not honour (another group size, static weights or activations scales, asymmetric
weights, a kv-cache scheme, sparsity, transforms) raises a ``ConfigError`` naming the key, which
``resolve --explain`` and the no-match error show; other configs are simply not claimed.
"""

from __future__ import annotations

import copy
from typing import Any

import conversion_core as cc
from conversion_core.formats.checkpoints import matches_module

#: compressed-tensors format name -> (conversion, num_bits).
FORMATS = {"mxfp8-quantized": ("mxfp8", 8), "mxfp4-pack-quantized": ("mxfp4", 4)}
_UINT8 = ("torch.uint8", "uint8")


def _refuse(fmt: str, what: str) -> cc.ConfigError:
    return cc.ConfigError(f"quantization_config with format {fmt!r}: {what}; the mx plugin cannot honour it")


def mx_format(qc: dict[str, Any]) -> str | None:
    """The MX format name the config's groups share, None when it is not an MX config; raises on an unservable one."""
    if qc.get("quant_method") != "compressed-tensors":
        return None
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        return None
    names = {str(g.get("format") or qc.get("format")) for g in groups.values() if isinstance(g, dict)}
    mx = names & set(FORMATS)
    if not mx:
        return None
    if len(names) != 1 or len(groups) != len([g for g in groups.values() if isinstance(g, dict)]):
        raise _refuse(sorted(mx)[0], f"config_groups mix formats {sorted(names)}")
    fmt = mx.pop()
    bits = FORMATS[fmt][1]
    if qc.get("quantization_status") not in (None, "compressed"):
        raise _refuse(fmt, f"quantization_status {qc.get('quantization_status')!r}, expected 'compressed'")
    for key in ("sparsity_config", "transform_config", "kv_cache_scheme"):
        if qc.get(key):
            raise _refuse(fmt, f"{key} {qc[key]!r} is set (expected none)")
    for name, group in groups.items():
        _check_weights(fmt, name, group.get("weights"), bits)
        _check_activations(fmt, name, group.get("input_activations"), bits)
        if group.get("output_activations") is not None:
            raise _refuse(fmt, f"config_groups.{name}.output_activations is set (expected null)")
    return fmt


def _check_weights(fmt: str, group: str, w: Any, bits: int) -> None:
    where = f"config_groups.{group}.weights"
    if not isinstance(w, dict):
        raise _refuse(fmt, f"{where} is {w!r}, expected a dict")
    want = {"num_bits": bits, "type": "float", "strategy": "group", "group_size": 32}
    for key, value in want.items():
        if w.get(key) != value:
            raise _refuse(fmt, f"{where}.{key} is {w.get(key)!r}, expected {value!r}")
    if w.get("symmetric", True) is not True:
        raise _refuse(fmt, f"{where}.symmetric is {w.get('symmetric')!r}, expected true (no zero points)")
    if w.get("dynamic", False) is not False:
        raise _refuse(fmt, f"{where}.dynamic is {w.get('dynamic')!r}, expected false (stored scales)")
    if w.get("scale_dtype") not in _UINT8:
        raise _refuse(fmt, f"{where}.scale_dtype is {w.get('scale_dtype')!r}, expected 'torch.uint8' (E8M0)")
    if w.get("zp_dtype") not in (None, *_UINT8):
        raise _refuse(fmt, f"{where}.zp_dtype is {w.get('zp_dtype')!r}, expected null")
    for key in ("actorder", "block_structure"):
        if w.get(key) is not None:
            raise _refuse(fmt, f"{where}.{key} is {w.get(key)!r}, expected null")


def _check_activations(fmt: str, group: str, a: Any, bits: int) -> None:
    """Absent (weight-only, ``MXFP8A16``) or dynamic (quantized at run time: nothing to ship)."""
    if a is None:
        return
    where = f"config_groups.{group}.input_activations"
    if not isinstance(a, dict) or a.get("dynamic") is not True:
        raise _refuse(fmt, f"{where} is not dynamic ({a!r}); static activations need input scales")


def claims(conversion: str) -> Any:
    def predicate(qc: dict[str, Any]) -> bool:
        fmt = mx_format(qc)
        return fmt is not None and FORMATS[fmt][0] == conversion

    predicate.__name__ = f"is_{conversion}_config"
    predicate.__doc__ = f"compressed-tensors ``{conversion}`` (group 32, E8M0 uint8 scales) configs."
    return predicate


def default_config(fmt: str, kept: list[str]) -> dict[str, Any]:
    """What llm-compressor 0.14 ``model_free_ptq(scheme=MXFP8 | MXFP4)`` writes, with ``kept`` ignored."""
    bits = FORMATS[fmt][1]
    args: dict[str, Any] = {
        "actorder": None,
        "block_structure": None,
        "group_size": 32,
        "num_bits": bits,
        "observer": None,
        "observer_kwargs": {},
        "scale_dtype": "torch.uint8",
        "strategy": "group",
        "symmetric": True,
        "type": "float",
        "zp_dtype": None,
    }
    scheme = "MXFP8" if bits == 8 else "MXFP4"
    return {
        "config_groups": {
            scheme: {
                "format": fmt,
                "input_activations": {**args, "dynamic": True},
                "output_activations": None,
                "targets": ["Linear"],
                "weights": {**args, "dynamic": False},
            }
        },
        "format": fmt,
        "global_compression_ratio": None,
        "ignore": sorted(kept),
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "transform_config": {},
    }


def with_kept(qc: dict[str, Any], kept: list[str]) -> dict[str, Any]:
    """``qc`` (a ``--like`` config) with the kept modules its ``ignore`` does not already cover added to it."""
    out = copy.deepcopy(qc)
    ignore = list(out.get("ignore") or [])
    covered = [m for m in sorted(kept) if any(matches_module(entry, m) for entry in ignore)]
    out["ignore"] = ignore + [m for m in sorted(kept) if m not in covered]
    return out
