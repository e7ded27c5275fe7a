"""`Rule`: which ``quantization_config`` selects which conversion, with a priority."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import ConversionTypeError


@dataclass(frozen=True)
class Rule:
    """Maps a ``quantization_config`` (a plain dict, ``{}`` when unquantized) to a conversion."""

    conversion: str
    predicate: Callable[[dict[str, Any]], bool]
    priority: int = 0
    name: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.conversion, str) or not self.conversion:
            raise ConversionTypeError(f"Rule.conversion must be a conversion name (str), got {self.conversion!r}")
        if not callable(self.predicate):
            raise ConversionTypeError(f"Rule {self.name or self.conversion!r}: predicate must be callable")
        if isinstance(self.priority, bool) or not isinstance(self.priority, int):
            raise ConversionTypeError(f"Rule {self.name or self.conversion!r}: priority must be an int")
        if not isinstance(self.name, str):
            raise ConversionTypeError(f"Rule for {self.conversion!r}: name must be a str")
