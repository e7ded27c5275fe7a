"""Turn any accepted form of a model config into its ``quantization_config`` as a plain dict.

Accepted: a dict (a whole config.json, or just its ``quantization_config``), a
``transformers.PretrainedConfig``, a path to a config.json or to a model directory, or a
model name (loaded with ``transformers.AutoConfig``, imported only then, never with
``trust_remote_code``). ``{}`` means the model is not quantized.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import ConfigError

#: Keys that mark a dict as a whole config.json rather than a bare quantization_config.
WHOLE_CONFIG_KEYS = ("quantization_config", "model_type", "architectures")


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
    keys = ", ".join(sorted(map(str, config))[:8])
    raise ConfigError(
        f"{origin} is neither a model config (it has none of the keys "
        f"{', '.join(WHOLE_CONFIG_KEYS)}) nor a quantization_config (no 'quant_method' key); "
        f"its keys: {keys}"
    )


def validate_quantization_config(qc: Any, origin: str = "quantization_config") -> dict[str, Any]:
    """Check the keys every rule relies on; return a deep plain copy predicates may not spoil."""
    if not isinstance(qc, Mapping):
        raise ConfigError(f"{origin} must be a mapping (a JSON object), got {type(qc).__name__}")
    plain = _plain(qc, origin)
    if not plain:
        return {}
    method = plain.get("quant_method")
    if not isinstance(method, str) or not method:
        raise ConfigError(
            f"{origin}['quant_method'] must be a non-empty string naming the quantization method, got {method!r}"
        )
    block = plain.get("weight_block_size")
    if block is not None and not (
        isinstance(block, list)
        and len(block) == 2
        and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
    ):
        raise ConfigError(
            f"{origin}['weight_block_size'] must be a list of two positive ints [rows, cols], got {block!r}"
        )
    for key in ("fmt", "scale_fmt", "activation_scheme", "quant_format", "format"):
        value = plain.get(key)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{origin}[{key!r}] must be a string, got {value!r}")
    return plain


def _plain(value: Any, origin: str) -> Any:
    """A deep copy made of dicts, lists and scalars (tuples become lists)."""
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"{origin} has a non-string key {k!r}")
            out[k] = _plain(v, f"{origin}[{k!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{origin}[{i}]") for i, v in enumerate(value)]
    return copy.deepcopy(value)


def _from_location(location: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(location).expanduser()
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"model directory {location} has no config.json")
        return _from_json_file(path)
    if path.is_file():
        return _from_json_file(path)
    text = os.fspath(location)
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


def _is_pretrained_config(obj: Any) -> bool:
    return any(cls.__name__ == "PretrainedConfig" for cls in type(obj).__mro__)


def _from_pretrained(config: Any) -> dict[str, Any]:
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return {}
    if not isinstance(qc, Mapping) and hasattr(qc, "to_dict"):
        qc = qc.to_dict()
    return validate_quantization_config(qc, f"{type(config).__name__}.quantization_config")
