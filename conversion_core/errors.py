"""Every error conversion-core raises derives from :class:`ConversionCoreError`.

Errors about a caller's input also derive from the builtin a caller would naturally
catch (``ValueError``, ``TypeError``, ``KeyError``), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class ConversionCoreError(Exception):
    """Base class of every conversion-core error."""


class ConversionInputError(ConversionCoreError, ValueError):
    """A tensor, buffer or argument has the wrong value, shape, dtype or device."""


class ConversionTypeError(ConversionCoreError, TypeError):
    """An argument has the wrong Python type."""


class ConfigError(ConversionCoreError, ValueError):
    """A model config or ``quantization_config`` cannot be read or is malformed."""


class NoMatchingConversionError(ConversionCoreError, ValueError):
    """No rule of any installed plugin matches the model's ``quantization_config``."""


class UnknownConversionError(ConversionCoreError, KeyError):
    """A conversion name that no loaded plugin registered."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class PluginError(ConversionCoreError):
    """A plugin could not be loaded (raised only in strict mode; otherwise a warning)."""


class DuplicateConversionError(PluginError):
    """Two plugins register one conversion name; never resolved silently."""


class PluginLoadWarning(UserWarning):
    """A plugin was skipped, or the plugin allowlist names something not installed."""
