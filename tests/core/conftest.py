"""Throwaway plugin distributions installed into a temporary site directory.

Each fake plugin is a real installed distribution: a ``NAME-VERSION.dist-info`` with
``METADATA`` and an ``entry_points.txt`` in the ``conversion_core`` group, next to the plugin's
module, on ``sys.path``. The core therefore discovers it exactly as it discovers a pip-installed
plugin. The built-in plugins may or may not be installed when these tests run, so every test
either restricts loading to its own fakes with ``CONVERSION_CORE_PLUGINS`` or filters on their
names, and fakes use made-up ``quant_method`` values.
"""

from __future__ import annotations

import importlib
import sys
import textwrap
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import conversion_core as cc

PLUGINS_ENV = "CONVERSION_CORE_PLUGINS"
STRICT_ENV = "CONVERSION_CORE_STRICT"

#: Prepended to every fake plugin module: what a small real plugin would import.
PRELUDE = """\
import torch
import conversion_core as cc

CALLS = []

def copy_fn(src, out, scale_out):
    CALLS.append((tuple(src.shape), scale_out is not None))
    out.copy_(src)
"""


def conversion_source(name: str, *, dst: str = "torch.float32", scaled: bool = False) -> str:
    """Source of a ``cc.Conversion`` expression for a fake plugin."""
    if scaled:
        return (
            f"cc.Conversion(name={name!r}, fn=copy_fn, requires_scale=True, dst_dtype={dst}, "
            "scale_shape=lambda s: (s[0],), scale_name='weight_scale')"
        )
    return f"cc.Conversion(name={name!r}, fn=copy_fn, requires_scale=False, dst_dtype={dst})"


def plugin_source(
    conversions: Sequence[str] = (),
    rules: Sequence[tuple[str, int, str, str]] = (),
    extra: str = "",
) -> str:
    """Source of a plugin registering ``conversions`` and ``rules``.

    ``rules`` are ``(conversion, priority, rule name, predicate expression over qc)``.
    """
    lines = [PRELUDE, textwrap.dedent(extra)]
    if conversions:
        items = ", ".join(conversion_source(c) for c in conversions)
        lines.append(f"@cc.hookimpl\ndef register_conversion():\n    return [{items}]\n")
    if rules:
        items = ", ".join(
            f"cc.Rule(conversion={c!r}, priority={p}, name={n!r}, predicate=lambda qc: {expr})"
            for c, p, n, expr in rules
        )
        lines.append(f"@cc.hookimpl\ndef default_rule():\n    return [{items}]\n")
    return "\n".join(lines)


@dataclass
class FakeSite:
    """A temporary site directory that fake plugin distributions are installed into."""

    path: Path
    monkeypatch: pytest.MonkeyPatch
    names: list[str] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)

    def install(
        self,
        name: str,
        source: str,
        *,
        dist: str | None = None,
        version: str = "1.0",
        module: str | None = None,
        target: str | None = None,
    ) -> str:
        """Install a distribution whose entry point ``name`` loads a module with ``source``.

        ``target`` overrides the entry point's value (default: the module itself).
        Returns the distribution name.
        """
        dist = dist or f"fake-cc-{name.replace('_', '-')}"
        module = module or f"fake_cc_{name}_{len(self.modules)}"
        (self.path / f"{module}.py").write_text(textwrap.dedent(source), encoding="utf-8")
        info = self.path / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n", encoding="utf-8")
        (info / "entry_points.txt").write_text(f"[conversion_core]\n{name} = {target or module}\n", encoding="utf-8")
        self.names.append(name)
        self.modules.append(module)
        importlib.invalidate_caches()  # also clears importlib.metadata's directory cache
        return dist

    def allow(self, *names: str) -> None:
        """Restrict loading to ``names`` (default: every fake installed so far)."""
        self.monkeypatch.setenv(PLUGINS_ENV, ",".join(names or self.names))

    def load(self, *names: str) -> cc.Registry:
        """Reload the registry with only ``names`` (default: all fakes) allowed."""
        self.allow(*names)
        return cc.load_registry(reload=True)

    #: Helpers for test modules, reachable through the fixture (test modules import no conftest).
    source = staticmethod(plugin_source)
    prelude = PRELUDE

    def infos(self, registry: cc.Registry) -> dict[str, cc.PluginInfo]:
        """The registry's records of this test's fake plugins only (built-ins may be installed)."""
        return {info.name: info for info in registry.plugins() if info.name in self.names}

    def module(self, name: str) -> object:
        """The imported module of the fake plugin whose entry point is ``name``."""
        return sys.modules[self.modules[self.names.index(name)]]


@pytest.fixture
def fake_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSite]:
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    monkeypatch.syspath_prepend(str(site_dir))
    monkeypatch.delenv(STRICT_ENV, raising=False)
    monkeypatch.delenv(PLUGINS_ENV, raising=False)
    site = FakeSite(site_dir, monkeypatch)
    yield site
    monkeypatch.undo()  # sys.path and environment back first, so the reload below sees the real site
    for module in site.modules:
        sys.modules.pop(module, None)
    importlib.invalidate_caches()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            cc.load_registry(reload=True)
        except cc.ConversionCoreError:
            pass  # the real environment's own problems are not this test's to report
