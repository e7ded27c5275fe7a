"""Discover plugins through entry points and call their hooks, one plugin at a time.

Each plugin is loaded and asked for its conversions and rules in isolation, so a plugin
whose import or hook raises, or whose hook returns the wrong type, is skipped whole and
recorded with its error while every other plugin keeps working.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import pluggy

from ..contract import Conversion, Rule
from ..errors import DuplicateConversionError, PluginError, PluginLoadWarning

ENTRY_POINT_GROUP = "conversion_core"
PLUGINS_ENV = "CONVERSION_CORE_PLUGINS"
STRICT_ENV = "CONVERSION_CORE_STRICT"

LOADED, FAILED, DISABLED = "loaded", "failed", "disabled"


@dataclass(frozen=True)
class PluginInfo:
    """One record per discovered entry point, whatever became of it."""

    name: str
    dist: str | None
    version: str | None
    status: str
    error: str | None = None
    conversions: tuple[str, ...] = ()
    rules: tuple[str, ...] = ()


@dataclass(frozen=True)
class RegisteredRule:
    """A rule together with the plugin that gave it and its place in that plugin's list."""

    rule: Rule
    plugin: str
    index: int

    @property
    def label(self) -> str:
        return self.rule.name or f"{self.rule.conversion}#{self.index}"


@dataclass
class LoadResult:
    infos: list[PluginInfo] = field(default_factory=list)
    conversions: list[tuple[Conversion, str]] = field(default_factory=list)
    rules: list[RegisteredRule] = field(default_factory=list)


def allowlist() -> set[str] | None:
    """None when every plugin may load; else the entry point names allowed (maybe none)."""
    raw = os.environ.get(PLUGINS_ENV)
    if raw is None:
        return None
    return {name.strip() for name in raw.split(",") if name.strip()}


def strict() -> bool:
    return os.environ.get(STRICT_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


class _Loading(threading.local):
    """Which plugin this thread is loading right now (None outside a load)."""

    plugin: str | None = None
    reentered: bool = False


_loading = _Loading()


def loading_plugin() -> str | None:
    """Entry point name of the plugin whose import or hook this thread is running, if any."""
    return _loading.plugin


def note_reentry() -> str:
    """Record that the plugin being loaded called ``load_registry()``; returns the error text."""
    _loading.reentered = True
    who = f"plugin {_loading.plugin!r}" if _loading.plugin else "a plugin"
    return f"{who} called load_registry() while the registry is being loaded"


def _check_hook_names(pm: pluggy.PluginManager, name: str, plugin: object) -> None:
    """A hookimpl whose name is no hookspec (e.g. a misspelt ``register_conversions``) is an error."""
    try:
        pm.check_pending()
    except pluggy.PluginValidationError:
        unknown = sorted(c.name for c in pm.get_hookcallers(plugin) or [] if not c.has_spec())
        known = ", ".join(sorted(n for n in vars(pm.hook) if getattr(pm.hook, n).has_spec()))
        raise PluginError(
            f"plugin {name!r} implements unknown hook(s) {', '.join(unknown) or '?'}; known hooks: {known}"
        ) from None


def _as_list(plugin: str, hook: str, results: list[Any], kind: type) -> list[Any]:
    items: list[Any] = []
    for result in results:
        seq = result if isinstance(result, Sequence) and not isinstance(result, (str, bytes)) else [result]
        for item in seq:
            if not isinstance(item, kind):
                raise PluginError(
                    f"hook {hook}() of plugin {plugin!r} returned {type(item).__name__}; "
                    f"expected a conversion_core.{kind.__name__} or a sequence of them"
                )
            items.append(item)
    return items


def _call_hook(pm: pluggy.PluginManager, name: str, plugin: object, hook: str) -> list[Any]:
    """Call only ``plugin``'s implementation of ``hook``; pluggy drops None results, we do not."""
    others = [p for p in pm.get_plugins() if p is not plugin]
    results = pm.subset_hook_caller(hook, others)()
    implemented = {caller.name for caller in pm.get_hookcallers(plugin) or []}
    if hook in implemented and not results:  # e.g. a forgotten `return`: never silently nothing
        raise PluginError(f"hook {hook}() of plugin {name!r} returned None; expected a value (an empty list for none)")
    return list(results)


def _call_hooks(pm: pluggy.PluginManager, name: str, plugin: object) -> tuple[list[Conversion], list[Rule]]:
    """Call ``plugin``'s own hook implementations (it is already registered with ``pm``)."""
    conversions = _as_list(name, "register_conversion", _call_hook(pm, name, plugin, "register_conversion"), Conversion)
    rules = _as_list(name, "default_rule", _call_hook(pm, name, plugin, "default_rule"), Rule)
    seen: set[str] = set()
    for conversion in conversions:
        if conversion.name in seen:
            raise PluginError(f"plugin {name!r} registers conversion {conversion.name!r} twice")
        seen.add(conversion.name)
    return conversions, rules


def _dist(ep: EntryPoint) -> tuple[str | None, str | None]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return None, None
    return dist.metadata["Name"], dist.version


def describe(name: str, dist: str | None, version: str | None) -> str:
    return f"plugin {name!r} (distribution {dist or '?'} {version or '?'})"


def load_plugins(pm: pluggy.PluginManager) -> LoadResult:
    """Discover every entry point of the group and load the allowed ones."""
    allowed = allowlist()
    result = LoadResult()
    found: dict[str, EntryPoint] = {}
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: (e.name, e.value)):
        dist, version = _dist(ep)
        if ep.name in found:
            if found[ep.name].value == ep.value and _dist(found[ep.name]) == (dist, version):
                continue  # the same distribution seen twice on sys.path
            first = _dist(found[ep.name])
            raise DuplicateConversionError(
                f"entry point name {ep.name!r} of group {ENTRY_POINT_GROUP!r} is claimed by two distributions: "
                f"{first[0] or '?'} {first[1] or '?'} ({found[ep.name].value}) and {dist or '?'} {version or '?'} "
                f"({ep.value}). Uninstall one of the distributions (pip uninstall <name>)."
            )
        found[ep.name] = ep
        if allowed is not None and ep.name not in allowed:
            result.infos.append(PluginInfo(ep.name, dist, version, DISABLED))
            continue
        plugin: object = None
        _loading.plugin, _loading.reentered = ep.name, False
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
            _check_hook_names(pm, ep.name, plugin)
            conversions, rules = _call_hooks(pm, ep.name, plugin)
            if _loading.reentered:  # even when the plugin swallowed the error load_registry() raised
                raise PluginError(note_reentry())
        except KeyboardInterrupt as exc:  # the user's Ctrl-C stops the program, saying what was running
            _unregister(pm, plugin)
            where = f"while loading {describe(ep.name, dist, version)}"
            exc.add_note(f"conversion-core: interrupted {where}")
            print(f"conversion-core: interrupted {where}", file=sys.stderr)
            raise
        except BaseException as exc:  # noqa: B036  any other failure, sys.exit() and GeneratorExit included,
            # is this plugin's load failure: it spares the others and never ends the host program
            _unregister(pm, plugin)
            error = f"{type(exc).__name__}: {exc}"
            result.infos.append(PluginInfo(ep.name, dist, version, FAILED, error))
            _report(describe(ep.name, dist, version), error)
            continue
        finally:
            _loading.plugin, _loading.reentered = None, False
        registered = [RegisteredRule(rule, ep.name, i) for i, rule in enumerate(rules)]
        result.conversions.extend((conversion, ep.name) for conversion in conversions)
        result.rules.extend(registered)
        result.infos.append(
            PluginInfo(
                ep.name,
                dist,
                version,
                LOADED,
                conversions=tuple(c.name for c in conversions),
                rules=tuple(r.label for r in registered),
            )
        )
    if allowed is not None:
        for missing in sorted(allowed - set(found)):
            installed = ", ".join(sorted(found)) or "none"
            _report(
                f"{PLUGINS_ENV} names {missing!r}",
                f"no such plugin is installed (installed: {installed})",
                fatal=False,
            )
    return result


def _unregister(pm: pluggy.PluginManager, plugin: object) -> None:
    if plugin is not None and pm.is_registered(plugin):
        pm.unregister(plugin)


def _report(who: str, error: str, fatal: bool = True) -> None:
    message = f"conversion-core: {who} skipped: {error}"
    if fatal and strict():
        raise PluginError(f"{message} ({STRICT_ENV}=1 makes this an error)")
    warnings.warn(message, PluginLoadWarning, stacklevel=4)
