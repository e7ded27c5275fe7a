"""Which modules a ``quantization_config`` leaves unquantized, read the way the engines read it.

Each factory takes a ``quantization_config`` dict and returns ``keep(tensor_name) -> str | None``:
the reason the tensor stays unquantized (naming the config key and entry), or None when the
config does not exempt it. Where transformers and vLLM would decide differently for a tensor, or
where the config cannot be decided from tensor names alone, a
:class:`~conversion_core.errors.ConfigError` with a one-line message naming the key and entry is
raised (at construction for config-wide problems, at the call for a name-specific one).

The module of a tensor is its name without the last dotted component
(``model.layers.0.self_attn.q_proj.weight`` -> ``model.layers.0.self_attn.q_proj``; a fused
expert parameter ``model.layers.0.mlp.experts.gate_up_proj`` -> ``model.layers.0.mlp.experts``).
Embeddings, norms, ``lm_head``, biases and router gates are the plan's own business; these
functions answer only what the config's module keys say.

Sources read (the rules below mirror them):

- transformers 5.24.0 (the installed version): ``quantizers/quantizers_utils.py``
  ``should_convert_module``; ``integrations/finegrained_fp8.py`` ``replace_with_fp8_linear``,
  ``replace_with_fp8_embedding``; ``integrations/fbgemm_fp8.py`` ``replace_with_fbgemm_fp8_linear``;
  ``quantizers/quantizer_finegrained_fp8.py`` ``_process_model_before_weight_loading``;
  ``utils/quantization_config.py`` ``FineGrainedFP8Config.__init__`` (``ignored_layers`` is an alias
  of ``modules_to_not_convert`` only when the latter is None).
- vLLM (github vllm-project/vllm): ``model_executor/layers/quantization/utils/quant_utils.py``
  ``is_layer_skipped`` (exact module-path match unless ``skip_with_substr``; fused shards must agree;
  the ``experts`` branch); ``model_executor/layers/quantization/fp8.py`` ``Fp8Config.from_config`` /
  ``get_quant_method`` (``ignored_layers``, fused mapping ``qkv_proj``/``gate_up_proj``).
- compressed-tensors (github vllm-project/compressed-tensors, commit ac8e2ba):
  ``src/compressed_tensors/utils/match.py`` ``is_match``, ``match_name`` (``re:`` -> ``re.match``
  from the start, otherwise equality), ``_match_class`` (class names in the MRO; ``LinearBase``
  counts as ``Linear``), ``match_quantizable_tensors`` (from tensor names: empty targets or
  ``"Linear"`` means every module).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from ..errors import ConfigError

#: vLLM's fused layers (``packed_modules_mapping`` of llama/qwen-style models): fused -> shards.
VLLM_FUSED: Mapping[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}

#: transformers' module boundary after a pattern (``should_convert_module``).
_BOUNDARY = r"(?:(?<=\.)|(?=\.|$))"
#: A compressed-tensors target/ignore entry that names a module class rather than a module path.
_CLASS_NAME = re.compile(r"^[A-Z][A-Za-z0-9_]*$")

Keep = Callable[[str], "str | None"]


def module_of(tensor_name: str) -> str:
    """The module holding ``tensor_name``: the name without its last dotted component."""
    return tensor_name.rpartition(".")[0]


def _module_list(qc: Mapping[str, Any], key: str) -> list[str]:
    value = qc.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"quantization_config[{key!r}] must be a list of module names, got {value!r}")
    return list(value)


def transformers_skips(module: str, entry: str) -> bool:
    """transformers 5.24 ``quantizers_utils.should_convert_module`` for one entry (True: not converted).

    The entry is a regex matched from the start of the module name up to a module boundary, or a
    plain suffix of the name (``str.endswith``, no boundary).
    """
    try:
        return re.match(rf"(?:{entry}){_BOUNDARY}", module) is not None or module.endswith(entry)
    except re.error as exc:
        raise ConfigError(f"module entry {entry!r} is not a valid regular expression for transformers: {exc}") from exc


def vllm_skips(module: str, entries: Sequence[str]) -> bool:
    """vLLM ``quant_utils.is_layer_skipped`` without fusion and ``skip_with_substr=False`` (the fp8 path).

    A module is skipped when its path equals an entry; a module under ``experts`` (vLLM's FusedMoE
    prefix) is skipped when it is a substring of an entry that contains ``experts``.
    """
    if "experts" in module:
        return any(module in entry for entry in entries if "experts" in entry)
    return module in entries


def _vllm_prefix(module: str) -> str:
    """The prefix vLLM sees: a per-expert module maps onto its FusedMoE layer (``...mlp.experts``)."""
    parts = module.split(".")
    if "experts" in parts:
        return ".".join(parts[: parts.index("experts") + 1])
    return module


def _fused_siblings(module: str, fused: Mapping[str, Sequence[str]]) -> list[str]:
    parent, _, leaf = module.rpartition(".")
    for shards in fused.values():
        if leaf in shards:
            return [f"{parent}.{s}" if parent else s for s in shards]
    return [module]


def hf_fp8_keep(qc: Mapping[str, Any], fused: Mapping[str, Sequence[str]] = VLLM_FUSED) -> Keep:
    """``keep(tensor_name)`` for the HF ``fp8`` (FineGrainedFP8) and ``fbgemm_fp8`` families.

    Keys: ``modules_to_not_convert`` and ``ignored_layers`` (transformers reads ``ignored_layers``
    only when ``modules_to_not_convert`` is absent; vLLM's ``Fp8Config`` reads ``ignored_layers``):
    both present and different is refused. A tensor is kept when both engines skip its module
    (:func:`transformers_skips`, :func:`vllm_skips`); when only one does, ConfigError. ``re:``
    entries are refused (compressed-tensors syntax both engines read literally). ``fused`` is the
    inference model's fused layers (default :data:`VLLM_FUSED`; ``{}`` for models that fuse
    nothing): shards of one fused layer that are skipped differently are refused, as vLLM's
    ``is_layer_skipped`` raises. ``modules_to_convert`` non-empty is refused: transformers quantizes
    those embeddings (``replace_with_fp8_embedding``, name ``endswith`` entry), vLLM does not read it.
    """
    method = qc.get("quant_method")
    if method not in ("fp8", "fbgemm_fp8"):
        raise ConfigError(f"hf_fp8_keep reads fp8/fbgemm_fp8 configs, got quant_method {method!r}")
    mtnc = _module_list(qc, "modules_to_not_convert")
    ignored = _module_list(qc, "ignored_layers")
    if qc.get("modules_to_not_convert") is not None and qc.get("ignored_layers") is not None and mtnc != ignored:
        raise ConfigError(
            "quantization_config has both 'modules_to_not_convert' and 'ignored_layers' and they differ: "
            "transformers reads the first, vLLM fp8 the second"
        )
    key = "modules_to_not_convert" if qc.get("modules_to_not_convert") is not None else "ignored_layers"
    entries = mtnc if qc.get("modules_to_not_convert") is not None else ignored
    for entry in entries:
        if entry.startswith("re:"):
            raise ConfigError(
                f"quantization_config[{key!r}] entry {entry!r}: 're:' is compressed-tensors syntax; "
                "transformers reads it as a literal regex and vLLM as a module path"
            )
        if not entry:
            raise ConfigError(f"quantization_config[{key!r}] has an empty entry, which transformers matches everywhere")
        transformers_skips("", entry)  # validate the regex now
    convert = _module_list(qc, "modules_to_convert")
    if convert:
        raise ConfigError(
            f"quantization_config['modules_to_convert'] entry {convert[0]!r}: transformers quantizes these "
            "embeddings, vLLM does not read the key"
        )

    def decide(module: str) -> str | None:
        hf = [e for e in entries if transformers_skips(module, e)]
        vl = vllm_skips(_vllm_prefix(module), entries)
        if bool(hf) != vl:
            entry = hf[0] if hf else next((e for e in entries if _vllm_prefix(module) in e), "?")
            raise ConfigError(
                f"quantization_config[{key!r}] entry {entry!r}: transformers {'skips' if hf else 'converts'} "
                f"{module!r}, vLLM {'skips' if vl else 'converts'} it"
            )
        if not hf:
            return None
        return f"ignored by config: {key} {hf[0]!r}"

    def keep(tensor_name: str) -> str | None:
        module = module_of(tensor_name)
        siblings = _fused_siblings(module, fused)
        reasons = {s: decide(s) for s in siblings}
        if len({r is None for r in reasons.values()}) > 1:
            skipped = next(s for s, r in reasons.items() if r is not None)
            raise ConfigError(
                f"quantization_config[{key!r}]: {skipped!r} is ignored but not every shard of its fused layer "
                f"({', '.join(siblings)}); vLLM refuses mixed precision in one fused layer"
            )
        return reasons[module]

    return keep


def ct_match_name(name: str, target: str) -> bool:
    """compressed-tensors ``utils/match.py`` ``match_name``, no fusion: ``re:`` regex from the start, else equality."""
    if target.startswith("re:"):
        try:
            return re.match(target.removeprefix("re:"), name) is not None
        except re.error as exc:
            raise ConfigError(f"compressed-tensors entry {target!r} is not a valid regular expression: {exc}") from exc
    return target == name


def _ct_targets(qc: Mapping[str, Any]) -> list[str]:
    groups = qc.get("config_groups") or {}
    if not isinstance(groups, Mapping):
        raise ConfigError("quantization_config['config_groups'] must be a mapping of group name to scheme")
    targets: list[str] = []
    for gname, group in groups.items():
        value = group.get("targets") if isinstance(group, Mapping) else None
        if value is None:
            continue
        if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
            raise ConfigError(f"quantization_config['config_groups'][{gname!r}]['targets'] must be a list of strings")
        targets.extend(value)
    return targets


def _check_entries(entries: Iterable[str], key: str, allow_linear: bool) -> None:
    for entry in entries:
        if entry.startswith("re:"):
            ct_match_name("", entry)
        elif _CLASS_NAME.match(entry) and not (allow_linear and entry == "Linear"):
            raise ConfigError(
                f"quantization_config[{key!r}] entry {entry!r} names a module class; which modules are "
                "of that class needs the model definition, not tensor names"
            )


def compressed_tensors_keep(qc: Mapping[str, Any], fused: Mapping[str, Sequence[str]] = VLLM_FUSED) -> Keep:
    """``keep(tensor_name)`` for ``quant_method == "compressed-tensors"``: targets and ``ignore``.

    Mirrors compressed-tensors ``is_match``: a module is quantized when a target matches it and no
    ignore entry does; names match by ``match_name`` (``re:`` from the start, else equality).
    Class names: ``"Linear"`` in targets is taken to cover every module (as
    ``match_quantizable_tensors`` does from tensor names; the plan keeps embeddings, norms and
    ``lm_head`` itself); any other class-name entry (``"Attention"``, ``"MoEGate"``, ``"Linear"``
    in ``ignore``) is refused. No targets at all: every module, as ``match_quantizable_tensors``.
    Shards of one fused layer (``fused``, as vLLM's ``should_ignore_layer`` checks) that are
    ignored or targeted differently are refused.
    """
    if qc.get("quant_method") != "compressed-tensors":
        raise ConfigError(f"compressed_tensors_keep reads compressed-tensors configs, got {qc.get('quant_method')!r}")
    ignore = _module_list(qc, "ignore")
    targets = _ct_targets(qc)
    _check_entries(targets, "config_groups.targets", allow_linear=True)
    _check_entries(ignore, "ignore", allow_linear=False)
    everything = not targets or "Linear" in targets

    def decide(module: str) -> str | None:
        hit = next((e for e in ignore if ct_match_name(module, e)), None)
        if hit is not None:
            return f"ignored by config: ignore {hit!r}"
        if not everything and not any(ct_match_name(module, t) for t in targets):
            return "not in config_groups targets"
        return None

    def keep(tensor_name: str) -> str | None:
        module = module_of(tensor_name)
        siblings = _fused_siblings(module, fused)
        reasons = {s: decide(s) for s in siblings}
        if len({r is None for r in reasons.values()}) > 1:
            detail = "; ".join(f"{s}: {r or 'quantized'}" for s, r in reasons.items())
            raise ConfigError(f"quantization_config ignore/targets split one fused layer: {detail}")
        return reasons[module]

    return keep


def module_keep(qc: Mapping[str, Any], fused: Mapping[str, Sequence[str]] = VLLM_FUSED) -> Keep | None:
    """The reader for ``qc``'s family (``fp8``/``fbgemm_fp8``, ``compressed-tensors``), None for others."""
    method = qc.get("quant_method")
    if method in ("fp8", "fbgemm_fp8"):
        return hf_fp8_keep(qc, fused)
    if method == "compressed-tensors":
        return compressed_tensors_keep(qc, fused)
    return None
