"""The receiver's check: refuse bytes that were converted for another kernel."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import ConversionTypeError


def normalise(value: Any) -> Any:
    """Lists and tuples compare equal, at any depth."""
    if isinstance(value, Mapping):
        return {k: normalise(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [normalise(v) for v in value]
    return value


def accepts(
    tags: Mapping[str, Any],
    compile_target_filter: Iterable[str] | None = None,
    required_compile_metadata: Mapping[str, Any] | None = None,
) -> bool:
    """True when ``tags`` pass the receiver's filter.

    :param tags: ``Conversion.tags`` as stamped by the sender.
    :param compile_target_filter: the compile targets the receiver's kernel reads; None: any.
    :param required_compile_metadata: key/values that must all be present and equal in
        ``tags["compile_metadata"]`` (a subset check).
    """
    if not isinstance(tags, Mapping):
        raise ConversionTypeError(f"tags must be a mapping, got {type(tags).__name__}")
    if isinstance(compile_target_filter, str):
        raise ConversionTypeError("compile_target_filter must be a collection of targets, not one str")
    if compile_target_filter is not None and tags.get("compile_target") not in set(compile_target_filter):
        return False
    if required_compile_metadata:
        metadata = tags.get("compile_metadata")
        if not isinstance(metadata, Mapping):
            return False
        for key, value in required_compile_metadata.items():
            if key not in metadata or normalise(metadata[key]) != normalise(value):
                return False
    return True
