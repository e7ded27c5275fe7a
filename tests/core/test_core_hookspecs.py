"""Every hook a plugin can implement is documented (in the spirit of datasette's test_plugins)."""

from __future__ import annotations

import inspect

import pluggy
import pytest

from conversion_core.contract import hookspecs

SPEC_MARK = f"{hookspecs.PROJECT_NAME}_spec"  # the attribute pluggy's HookspecMarker sets


def _hook_names() -> list[str]:
    """Hooks as pluggy itself sees them, so a spec added any way at all is caught."""
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    return sorted(name for name in vars(pm.hook) if not name.startswith("_"))


def test_the_contract_hooks_exist() -> None:
    assert {"register_conversion", "default_rule"} <= set(_hook_names())


@pytest.mark.parametrize("name", _hook_names())
def test_hook_is_documented(name: str) -> None:
    spec = getattr(hookspecs, name)
    assert hasattr(spec, SPEC_MARK), f"{name} is a hook but not marked with @hookspec"
    doc = inspect.getdoc(spec) or ""
    assert doc.strip(), f"hook {name} has no docstring"
    assert ":return:" in doc, f"hook {name}'s docstring does not say what it returns (':return:')"
    assert "Example" in doc, f"hook {name}'s docstring has no 'Example'"
    assert "@conversion_core.hookimpl" in doc, f"hook {name}'s example does not show the hookimpl marker"
    assert f"def {name}(" in doc, f"hook {name}'s example does not implement {name}"


def test_every_marked_spec_is_a_hook() -> None:
    marked = sorted(name for name, obj in vars(hookspecs).items() if hasattr(obj, SPEC_MARK))
    assert marked == _hook_names()
