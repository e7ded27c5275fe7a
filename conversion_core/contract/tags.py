"""Read-only, JSON-ready metadata: what travels with the bytes as ``compile_metadata``.

A receiver compares tags after a JSON round trip, so the core freezes what a plugin declares
(mappings become read-only, lists become tuples) and refuses values JSON would not carry intact.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from ..errors import ConversionTypeError


def freeze(value: Any) -> Any:
    """Deep read-only copy: mappings become MappingProxyType, lists become tuples."""
    if isinstance(value, Mapping):
        return MappingProxyType({str(k): freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """Plain JSON-ready copy of a frozen value (tuples become lists)."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [thaw(v) for v in value]
    return value


def check_json_ready(where: str, metadata: Mapping[str, Any]) -> None:
    """Refuse metadata that would not survive the trip to a receiver as JSON."""
    try:
        if not _str_keys_only(metadata):
            raise TypeError("every mapping key must be a str")
        json.dumps(thaw(metadata), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConversionTypeError(
            f"{where}: compile_metadata must hold only JSON values (str, int, float, bool, None, "
            f"lists, str-keyed mappings): {exc}"
        ) from None


def _str_keys_only(value: Any) -> bool:
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _str_keys_only(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_str_keys_only(v) for v in value)
    return True
