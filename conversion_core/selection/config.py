"""Turn any accepted form of a model config into its ``quantization_config`` as a plain dict.

Accepted: a dict (a whole config.json, or just its ``quantization_config``), a
``transformers.PretrainedConfig``, a path to a config.json or to a model directory, or a
model name (loaded with ``transformers.AutoConfig``, imported only then, never with
``trust_remote_code``). ``{}`` means the model is not quantized.

Whatever comes in, what comes out is a deep copy made of dicts with str keys and lists (so
predicates cannot spoil the caller's config and see JSON-shaped data), and every failure is a
:class:`~conversion_core.errors.ConfigError` naming the key at fault and what was expected.
"""

from __future__ import annotations

import copy
import enum
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError

#: Keys that mark a dict as a whole config.json rather than a bare quantization_config.
WHOLE_CONFIG_KEYS = ("quantization_config", "model_type", "architectures")

#: Nesting deeper than this is not a config anybody wrote; refusing it keeps recursion bounded.
MAX_DEPTH = 64


def quantization_config_of(config: Any) -> dict[str, Any]:
    """The model's ``quantization_config`` as a plain, validated dict (``{}`` when none)."""
    if isinstance(config, Mapping):
        return _from_mapping(config, "config")
    if isinstance(config, (str, os.PathLike)):
        return _from_location(config)
    if _is_pretrained_config(config):
        return _from_pretrained(config)
    raise ConfigError(
        f"cannot read a model config from {type(config).__name__}; expected a dict, a "
        "transformers.PretrainedConfig, a path to config.json or a model directory, or a model name"
    )


def _from_mapping(config: Mapping[Any, Any], origin: str) -> dict[str, Any]:
    if "quant_method" in config:
        return validate_quantization_config(config, origin)
    if not config:
        return {}
    if any(key in config for key in WHOLE_CONFIG_KEYS):
        qc = config.get("quantization_config")
        if qc is None:
            return {}
        return validate_quantization_config(qc, f"{origin}['quantization_config']")
    keys = ", ".join(sorted(map(repr, config))[:8])
    raise ConfigError(
        f"{origin} is neither a model config (it has none of the keys "
        f"{', '.join(WHOLE_CONFIG_KEYS)}) nor a quantization_config (no 'quant_method' key); "
        f"its keys: {keys}"
    )


def validate_quantization_config(qc: Any, origin: str = "quantization_config") -> dict[str, Any]:
    """Check what every format shares (a non-empty ``quant_method``); return a deep plain copy.

    The keys a format reads (block sizes, ignore lists, ...) are checked by the rules that claim
    them (:attr:`conversion_core.Rule.validate`), never here: the core knows no format's keys.
    """
    if not isinstance(qc, Mapping):
        raise ConfigError(f"{origin} must be a mapping (a JSON object), got {type(qc).__name__}")
    plain = _plain(qc, origin, 0)
    if not plain:
        return {}
    method = plain.get("quant_method")
    if not isinstance(method, str) or not method:
        raise ConfigError(
            f"{origin}['quant_method'] must be a non-empty string naming the quantization method, got {method!r}"
        )
    return plain


def _plain(value: Any, origin: str, depth: int) -> Any:
    """A deep copy in which every mapping is a dict with str keys and every sequence a list.

    Str-valued enums (transformers' ``QuantizationMethod``) become plain strings so that
    ``==``, ``json.dumps`` and ``repr`` behave as for a config read from JSON. Other leaves
    (a ``torch.dtype``, a quantizer's own objects) are deep-copied as they are: no built-in
    rule matches them, and a plugin that understands them may.
    """
    if depth > MAX_DEPTH:
        raise ConfigError(f"{origin} is nested more than {MAX_DEPTH} levels deep; expected a JSON-like config")
    if isinstance(value, enum.Enum) and isinstance(value.value, (str, int, float, bool)):
        value = value.value
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if isinstance(k, enum.Enum) and isinstance(k.value, str):
                k = k.value
            if not isinstance(k, str):
                raise ConfigError(f"{origin} has a non-string key {k!r}; expected JSON object keys (strings)")
            out[str(k)] = _plain(v, f"{origin}[{k!r}]", depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{origin}[{i}]", depth + 1) for i, v in enumerate(value)]
    if isinstance(value, str):
        return str.__str__(value)  # a plain str even from a str subclass
    if value is None or isinstance(value, (bool, int, float)):
        return value
    try:
        return copy.deepcopy(value)
    except Exception as exc:  # locks, open files, ... cannot be copied for the predicates
        raise ConfigError(
            f"{origin} holds a {type(value).__name__} that cannot be copied ({exc}); expected a JSON-like value"
        ) from exc


def _from_location(location: str | os.PathLike[str]) -> dict[str, Any]:
    text = os.fspath(location)
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(
            f"config location {text!r} is empty; expected a path to config.json, a model directory or a model name"
        )
    try:
        path = Path(text).expanduser()
        is_dir, is_file = path.is_dir(), path.is_file()
    except (OSError, ValueError) as exc:  # embedded NUL, name too long, ...
        raise ConfigError(f"config location {text!r} is not a usable path: {exc}") from exc
    if is_dir:
        path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"model directory {text} has no config.json")
        return _from_json_file(path)
    if is_file:
        return _from_json_file(path)
    if isinstance(location, os.PathLike) or text.endswith(".json") or text.startswith(("/", ".", "~")):
        raise ConfigError(f"config path {text} does not exist")
    return _from_model_name(text)


def _from_json_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise ConfigError(f"{path} is nested too deeply to be a model config") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return _from_mapping(data, str(path))


def _from_model_name(name: str) -> dict[str, Any]:
    try:
        from transformers import AutoConfig
    except ImportError as exc:
        raise ConfigError(
            f"{name!r} is not a file or directory, and loading a config by model name needs "
            "transformers: pip install 'conversion-core[hf]'"
        ) from exc
    try:
        loaded = AutoConfig.from_pretrained(name, trust_remote_code=False)
    except Exception as exc:  # transformers raises OSError, ValueError, ... for unknown names
        raise ConfigError(f"cannot load the config of model {name!r}: {exc}") from exc
    return _from_pretrained(loaded)


#: transformers 5 renamed ``PretrainedConfig`` to ``PreTrainedConfig`` (the old name is an alias).
PRETRAINED_CONFIG_CLASS_NAMES = ("PretrainedConfig", "PreTrainedConfig")


def _is_pretrained_config(obj: Any) -> bool:
    """True for a transformers config object, without importing transformers to find out."""
    return any(
        cls.__name__ in PRETRAINED_CONFIG_CLASS_NAMES and cls.__module__.startswith("transformers")
        for cls in type(obj).__mro__
    )


def _from_pretrained(config: Any) -> dict[str, Any]:
    origin = f"{type(config).__name__}.quantization_config"
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return {}
    if not isinstance(qc, Mapping) and hasattr(qc, "to_dict"):
        try:
            qc = qc.to_dict()
        except Exception as exc:  # a quantizer config object that cannot describe itself
            raise ConfigError(f"{origin}.to_dict() failed: {exc!r}") from exc
    return validate_quantization_config(qc, origin)
