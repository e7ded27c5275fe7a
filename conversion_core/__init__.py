"""conversion-core: turn trainer weights into the exact bytes an inference kernel expects."""

from .contract import BlockAmax, Conversion, Output, Rule, TargetFormat
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
from .hookspecs import hookimpl
from .plugins import PluginInfo
from .receiver import accepts
from .registry import Registry, load_registry
from .resolver import RuleOutcome, explain, select_default_conversion

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
    "TargetFormat",
    "UnknownConversionError",
    "accepts",
    "explain",
    "hookimpl",
    "load_registry",
    "select_default_conversion",
]
