"""`Rule`: which ``quantization_config`` selects which conversion, with a priority."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import ConversionTypeError


@dataclass(frozen=True)
class Rule:
    """Maps a ``quantization_config`` (a plain dict, ``{}`` when unquantized) to a conversion.

    ``validate`` checks the config keys the rule claims (their types and shapes) and raises a
    :class:`~conversion_core.errors.ConfigError` naming the key for a malformed one. The core reads
    no format's keys itself, so this is where a block size written as one int becomes an error instead
    of a silent "no match". Every rule's ``validate`` runs before any predicate.
    """

    conversion: str
    predicate: Callable[[dict[str, Any]], bool]
    priority: int = 0
    name: str = ""
    validate: Callable[[dict[str, Any]], None] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.conversion, str) or not self.conversion:
            raise ConversionTypeError(f"Rule.conversion must be a conversion name (str), got {self.conversion!r}")
        if not callable(self.predicate):
            raise ConversionTypeError(f"Rule {self.name or self.conversion!r}: predicate must be callable")
        if isinstance(self.priority, bool) or not isinstance(self.priority, int):
            raise ConversionTypeError(f"Rule {self.name or self.conversion!r}: priority must be an int")
        if self.validate is not None and not callable(self.validate):
            raise ConversionTypeError(f"Rule {self.name or self.conversion!r}: validate must be callable or None")
        if not isinstance(self.name, str):
            raise ConversionTypeError(f"Rule for {self.conversion!r}: name must be a str")
