"""The registry: every loaded conversion and rule, with the plugin that provided it.

Loaded once per process (:func:`load_registry`) and cached; ``reload=True`` re-scans the
entry points, e.g. after installing a plugin or changing ``CONVERSION_CORE_PLUGINS``.
"""

from __future__ import annotations

import threading
import warnings

import pluggy

from ..contract import Conversion, hookspecs
from ..errors import DuplicateConversionError, PluginError, PluginLoadWarning, UnknownConversionError
from .plugins import (
    FAILED,
    PLUGINS_ENV,
    STRICT_ENV,
    PluginInfo,
    RegisteredRule,
    describe,
    load_plugins,
    note_reentry,
    strict,
)


class Registry:
    """Conversions by name, rules in resolution order, and one record per plugin."""

    def __init__(
        self,
        infos: list[PluginInfo],
        conversions: list[tuple[Conversion, str]],
        rules: list[RegisteredRule],
        plugin_manager: pluggy.PluginManager | None = None,
    ):
        self.plugin_manager = plugin_manager
        self._infos = list(infos)
        self._conversions: dict[str, Conversion] = {}
        self._providers: dict[str, str] = {}
        info_by_name = {info.name: info for info in infos}
        for conversion, plugin in conversions:
            if conversion.name in self._conversions:
                first, second = info_by_name[self._providers[conversion.name]], info_by_name[plugin]
                raise DuplicateConversionError(
                    f"conversion {conversion.name!r} is registered by two plugins: "
                    f"{describe(first.name, first.dist, first.version)} and "
                    f"{describe(second.name, second.dist, second.version)}. Uninstall one of the "
                    f"distributions, or choose with {PLUGINS_ENV}=<comma-separated entry point names>."
                )
            self._conversions[conversion.name] = conversion
            self._providers[conversion.name] = plugin
        ordered = sorted(rules, key=lambda r: (-r.rule.priority, r.plugin, r.index))
        self._rules = [r for r in ordered if r.rule.conversion in self._conversions]
        self.orphan_rules = [r for r in ordered if r.rule.conversion not in self._conversions]
        for orphan in self.orphan_rules:
            info = info_by_name[orphan.plugin]
            message = (
                f"conversion-core: rule {orphan.label!r} of {describe(info.name, info.dist, info.version)} "
                f"names conversion {orphan.rule.conversion!r}, which no loaded plugin registers; "
                "the rule is never selected"
            )
            if strict():
                raise PluginError(f"{message} ({STRICT_ENV}=1 makes this an error)")
            warnings.warn(message, PluginLoadWarning, stacklevel=3)

    def get(self, name: str) -> Conversion:
        """The conversion registered under ``name`` (its ``fn`` is the checked callable)."""
        try:
            return self._conversions[name]
        except (KeyError, TypeError):
            raise UnknownConversionError(f"unknown conversion {name!r}; {self.summary()}") from None

    def names(self) -> list[str]:
        return sorted(self._conversions)

    def rules(self) -> list[RegisteredRule]:
        """Rules in resolution order: priority high to low, then plugin name, then plugin order."""
        return list(self._rules)

    def plugins(self) -> list[PluginInfo]:
        return list(self._infos)

    def provider(self, conversion_name: str) -> str:
        """Entry point name of the plugin that registered ``conversion_name``."""
        self.get(conversion_name)
        return self._providers[conversion_name]

    def summary(self) -> str:
        """What is registered and what failed, for error messages."""
        registered = ", ".join(self.names()) or "none"
        text = f"registered conversions: {registered}"
        failed = [i for i in self._infos if i.status == FAILED]
        if failed:
            text += "; plugins that failed to load: " + "; ".join(
                f"{i.name} ({i.dist or '?'}): {i.error}" for i in failed
            )
        if not self._conversions:
            text += f" (is a plugin installed, and does {PLUGINS_ENV} allow it?)"
        return text


_lock = threading.Lock()
_loader: int | None = None  # ident of the thread loading the registry right now
_cached: Registry | None = None


def load_registry(reload: bool = False) -> Registry:
    """Discover and load plugins once per process; ``reload=True`` re-scans.

    Thread-safe: a second thread calling this while a load runs waits for it and gets its
    result. A plugin that calls it back while it is being loaded (at import or in a hook)
    gets a :class:`PluginError` at once instead of a deadlock, and is a load failure.
    """
    global _cached, _loader
    if _loader == threading.get_ident():
        raise PluginError(f"conversion-core: {note_reentry()}")
    with _lock:
        if _cached is None or reload:
            _loader = threading.get_ident()
            try:
                pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
                pm.add_hookspecs(hookspecs)
                result = load_plugins(pm)
                _cached = Registry(result.infos, result.conversions, result.rules, pm)
            finally:
                _loader = None
        return _cached
