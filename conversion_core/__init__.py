"""conversion-core: turn trainer weights into the exact bytes an inference kernel expects."""

from typing import Any

from .contract import BlockAmax, Conversion, Output, Rule, SharedAmax, TargetFormat
from .contract.conversion import set_sharded_executor
from .contract.hookspecs import hookimpl
from .errors import (
    ConfigError,
    ConversionCoreError,
    ConversionInputError,
    ConversionTypeError,
    DuplicateConversionError,
    NoMatchingConversionError,
    PluginError,
    PluginLoadWarning,
    UnknownConversionError,
)
from .loading import PluginInfo, Registry, load_registry
from .selection import RuleOutcome, accepts, explain, select_default_conversion


class _LazyShardedExecutor:
    """The plan's DTensor executor, imported on the first DTensor source (torch.distributed.tensor
    costs seconds to import; most processes never need it)."""

    def convert(self, conversion: Conversion, src: Any) -> tuple[Any, ...]:
        from .plan import sharded

        return sharded.convert(conversion, src)

    def convert_into(self, conversion: Conversion, src: Any, *buffers: Any) -> None:
        from .plan import sharded

        sharded.convert_into(conversion, src, *buffers)


set_sharded_executor(_LazyShardedExecutor())

__all__ = [
    "BlockAmax",
    "ConfigError",
    "Conversion",
    "ConversionCoreError",
    "ConversionInputError",
    "ConversionTypeError",
    "DuplicateConversionError",
    "NoMatchingConversionError",
    "Output",
    "PluginError",
    "PluginInfo",
    "PluginLoadWarning",
    "Registry",
    "Rule",
    "RuleOutcome",
    "SharedAmax",
    "TargetFormat",
    "UnknownConversionError",
    "accepts",
    "explain",
    "hookimpl",
    "load_registry",
    "select_default_conversion",
]
