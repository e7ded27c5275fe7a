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


def plugin_failure(what: str, exc: BaseException) -> PluginError:
    """The error for plugin code (``what``: which conversion's which function) that raised a
    ``BaseException`` that is not an ``Exception`` (``sys.exit(0)``, a bare ``BaseException``):
    a conversion must write its buffers or raise, never end the trainer or pass for a success.
    ``KeyboardInterrupt`` is never turned into one: the user's Ctrl-C still stops."""
    return PluginError(
        f"{what} raised {type(exc).__name__}({exc}); a conversion must write its buffers or raise an Exception"
    )


class DuplicateConversionError(PluginError):
    """Two plugins register one conversion name; never resolved silently."""


class PluginLoadWarning(UserWarning):
    """A plugin was skipped, or the plugin allowlist names something not installed."""
