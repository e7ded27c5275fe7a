"""Plugin discovery and the failure policy, proven on real (throwaway) installed distributions."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch

import conversion_core as cc

FakeSite = Any  # the fake_site fixture's type lives in conftest.py, which test modules do not import


def good_source(site: FakeSite) -> str:
    return site.source(
        conversions=["zz_good_copy"],
        rules=[("zz_good_copy", 5, "good-rule", "qc.get('quant_method') == 'zz_good'")],
    )


def _messages(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, cc.PluginLoadWarning)]


# --- discovery -------------------------------------------------------------------------------


def test_discovery_records_name_dist_version_status_and_contributions(fake_site: FakeSite) -> None:
    fake_site.install(
        "alpha",
        fake_site.source(
            conversions=["zz_alpha_one", "zz_alpha_two"],
            rules=[
                ("zz_alpha_one", 3, "alpha-first", "qc.get('quant_method') == 'zz_alpha'"),
                ("zz_alpha_two", 1, "alpha-second", "False"),
            ],
        ),
        dist="fake-alpha-dist",
        version="1.2.3",
    )
    fake_site.install("beta", good_source(fake_site), dist="fake-beta-dist", version="0.9")
    registry = fake_site.load("alpha")  # beta installed but not allowed

    infos = fake_site.infos(registry)
    assert infos["alpha"] == cc.PluginInfo(
        name="alpha",
        dist="fake-alpha-dist",
        version="1.2.3",
        status="loaded",
        error=None,
        conversions=("zz_alpha_one", "zz_alpha_two"),
        rules=("alpha-first", "alpha-second"),
    )
    assert infos["beta"] == cc.PluginInfo("beta", "fake-beta-dist", "0.9", "disabled")
    assert registry.names() == ["zz_alpha_one", "zz_alpha_two"]
    assert registry.get("zz_alpha_two").name == "zz_alpha_two"
    assert registry.provider("zz_alpha_one") == "alpha"
    assert [(r.plugin, r.rule.name, r.rule.priority) for r in registry.rules()] == [
        ("alpha", "alpha-first", 3),
        ("alpha", "alpha-second", 1),
    ]


def test_registry_is_cached_until_reload(fake_site: FakeSite) -> None:
    fake_site.install("alpha", good_source(fake_site))
    fake_site.allow("alpha", "late")
    with pytest.warns(cc.PluginLoadWarning, match="'late'.*no such plugin is installed"):
        first = cc.load_registry(reload=True)
    assert cc.load_registry() is first

    fake_site.install("late", fake_site.source(conversions=["zz_late_copy"]))
    assert "zz_late_copy" not in cc.load_registry().names()  # discovered once per process
    reloaded = cc.load_registry(reload=True)
    assert reloaded is not first
    assert "zz_late_copy" in reloaded.names()
    assert cc.load_registry() is reloaded


def test_fn_from_the_registry_is_the_checked_callable(fake_site: FakeSite) -> None:
    fake_site.install("alpha", good_source(fake_site))
    conversion = fake_site.load().get("zz_good_copy")
    calls = fake_site.module("alpha").CALLS  # type: ignore[attr-defined]
    with pytest.raises(cc.ConversionInputError, match=r"expected shape \(2, 3\), dtype torch.float32"):
        conversion.fn(torch.ones(2, 3), torch.empty(2, 3, dtype=torch.float16), None)
    assert calls == []  # the plugin's function never saw the bad buffer
    out = torch.empty(2, 3)
    conversion.fn(torch.full((2, 3), 7.0, dtype=torch.bfloat16), out, None)
    assert calls == [((2, 3), False)]
    assert torch.equal(out, torch.full((2, 3), 7.0))


# --- allowlist -------------------------------------------------------------------------------


@pytest.fixture
def three(fake_site: FakeSite) -> FakeSite:
    for name in ("alpha", "beta", "gamma"):
        fake_site.install(name, fake_site.source(conversions=[f"zz_{name}_copy"]))
    return fake_site


def test_allowlist_unset_loads_every_plugin(three: FakeSite, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONVERSION_CORE_PLUGINS", raising=False)
    registry = cc.load_registry(reload=True)
    assert {n: i.status for n, i in three.infos(registry).items()} == {
        "alpha": "loaded",
        "beta": "loaded",
        "gamma": "loaded",
    }
    assert {"zz_alpha_copy", "zz_beta_copy", "zz_gamma_copy"} <= set(registry.names())


def test_allowlist_comma_list_loads_only_those(three: FakeSite, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVERSION_CORE_PLUGINS", " gamma , alpha,")
    with warnings.catch_warnings():
        warnings.simplefilter("error", cc.PluginLoadWarning)  # every listed name exists: no warning
        registry = cc.load_registry(reload=True)
    assert {n: i.status for n, i in three.infos(registry).items()} == {
        "alpha": "loaded",
        "beta": "disabled",
        "gamma": "loaded",
    }
    assert registry.names() == ["zz_alpha_copy", "zz_gamma_copy"]  # nothing else, built-ins included


def test_allowlist_empty_string_loads_nothing(three: FakeSite, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVERSION_CORE_PLUGINS", "")
    registry = cc.load_registry(reload=True)
    assert all(info.status == "disabled" for info in registry.plugins())
    assert {i.name for i in registry.plugins()} >= {"alpha", "beta", "gamma"}
    assert registry.names() == [] and registry.rules() == []
    with pytest.raises(cc.UnknownConversionError, match="CONVERSION_CORE_PLUGINS"):
        registry.get("zz_alpha_copy")


def test_allowlist_misspelt_name_warns_naming_it(three: FakeSite, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVERSION_CORE_PLUGINS", "alpha,gamam")
    with pytest.warns(cc.PluginLoadWarning) as record:
        registry = cc.load_registry(reload=True)
    messages = _messages(record)
    assert len(messages) == 1
    assert "'gamam'" in messages[0] and "CONVERSION_CORE_PLUGINS" in messages[0]
    assert "gamma" in messages[0]  # the installed names are listed, so the typo is easy to see
    assert {n: i.status for n, i in three.infos(registry).items()} == {
        "alpha": "loaded",
        "beta": "disabled",
        "gamma": "disabled",
    }


# --- isolation of broken plugins -----------------------------------------------------------


def test_broken_import_is_isolated_and_reported_once(fake_site: FakeSite) -> None:
    fake_site.install("good", good_source(fake_site))
    fake_site.install("broken", "raise ImportError('needs zz_missing_lib')\n", dist="fake-broken-dist", version="0.3.1")
    with pytest.warns(cc.PluginLoadWarning) as record:
        registry = fake_site.load()
    messages = [m for m in _messages(record) if "broken" in m]
    assert len(messages) == 1
    for part in ("'broken'", "fake-broken-dist", "0.3.1", "ImportError", "needs zz_missing_lib"):
        assert part in messages[0]
    infos = fake_site.infos(registry)
    assert infos["broken"].status == "failed"
    assert "needs zz_missing_lib" in (infos["broken"].error or "")
    assert infos["broken"].conversions == () and infos["broken"].rules == ()
    assert infos["good"].status == "loaded"
    out, scale = registry.get("zz_good_copy").convert(torch.arange(6.0).reshape(2, 3))
    assert scale is None and torch.equal(out, torch.arange(6.0).reshape(2, 3))
    assert cc.select_default_conversion({"quant_method": "zz_good"}, registry) == "zz_good_copy"


@pytest.mark.parametrize(("where", "code"), [("import", "import sys\nsys.exit(3)\n"), ("hook", None)])
def test_plugin_calling_sys_exit_is_a_load_failure(fake_site: FakeSite, where: str, code: str | None) -> None:
    if code is None:  # sys.exit() from inside register_conversion
        code = "import sys\nimport conversion_core as cc\n\n@cc.hookimpl\ndef register_conversion():\n    sys.exit(4)\n"
    fake_site.install("good", good_source(fake_site))
    fake_site.install("exits", code)
    with pytest.warns(cc.PluginLoadWarning, match=f"'exits'.*SystemExit: {3 if where == 'import' else 4}"):
        registry = fake_site.load()
    assert fake_site.infos(registry)["exits"].status == "failed"
    assert registry.names() == ["zz_good_copy"]


def test_entry_point_to_missing_attribute_is_isolated(fake_site: FakeSite) -> None:
    fake_site.install("good", good_source(fake_site))
    fake_site.install("typo", good_source(fake_site), target="fake_cc_typo_module_that_does_not_exist")
    with pytest.warns(cc.PluginLoadWarning, match="'typo'.*ModuleNotFoundError"):
        registry = fake_site.load()
    assert fake_site.infos(registry)["typo"].status == "failed"
    assert registry.names() == ["zz_good_copy"]


def test_hook_that_raises_is_isolated_and_nothing_half_registered(fake_site: FakeSite) -> None:
    """register_conversion succeeds, default_rule raises: the plugin contributes nothing."""
    fake_site.install("good", good_source(fake_site))
    fake_site.install(
        "half",
        fake_site.source(
            conversions=["zz_half_copy"],
            extra="""
            @cc.hookimpl
            def default_rule():
                raise RuntimeError("rule table corrupt")
            """,
        ),
        dist="fake-half",
        version="2.0",
    )
    with pytest.warns(cc.PluginLoadWarning, match=r"'half'.*fake-half 2\.0.*RuntimeError: rule table corrupt"):
        registry = fake_site.load()
    info = fake_site.infos(registry)["half"]
    assert (info.status, info.conversions, info.rules) == ("failed", (), ())
    assert "rule table corrupt" in (info.error or "")
    assert registry.names() == ["zz_good_copy"]
    assert {r.plugin for r in registry.rules()} == {"good"}
    with pytest.raises(cc.UnknownConversionError):
        registry.get("zz_half_copy")
    # its hooks are not left registered with pluggy either
    assert registry.plugin_manager is not None
    assert registry.plugin_manager.get_plugin("half") is None


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # register_conversion returns a str
        ("@cc.hookimpl\ndef register_conversion():\n    return 'zz_bad_copy'\n", r"returned str.*Conversion"),
        # a Rule where a Conversion is expected (second item of the list)
        (
            "@cc.hookimpl\ndef register_conversion():\n"
            "    return [cc.Conversion('zz_bad_copy', copy_fn, False), cc.Rule('zz_bad_copy', bool)]\n",
            r"register_conversion\(\).*returned Rule; expected a conversion_core\.Conversion",
        ),
        # default_rule returns a dict
        (
            "@cc.hookimpl\ndef register_conversion():\n    return cc.Conversion('zz_bad_copy', copy_fn, False)\n"
            "@cc.hookimpl\ndef default_rule():\n    return {'conversion': 'zz_bad_copy'}\n",
            r"default_rule\(\).*returned dict; expected a conversion_core\.Rule",
        ),
    ],
    ids=["str", "rule-in-conversions", "dict-rule"],
)
def test_wrong_hook_return_type_is_isolated(fake_site: FakeSite, body: str, expected: str) -> None:
    fake_site.install("good", good_source(fake_site))
    fake_site.install("bad", fake_site.prelude + body)
    with pytest.warns(cc.PluginLoadWarning, match=expected):
        registry = fake_site.load()
    info = fake_site.infos(registry)["bad"]
    assert info.status == "failed" and info.conversions == ()
    assert registry.names() == ["zz_good_copy"]


def test_hook_returning_none_is_a_load_failure_not_silently_nothing(fake_site: FakeSite) -> None:
    fake_site.install("good", good_source(fake_site))
    fake_site.install(
        "forgot",
        fake_site.source(
            extra="""
            @cc.hookimpl
            def register_conversion():
                cc.Conversion("zz_forgot_copy", copy_fn, False)  # no return
            """
        ),
    )
    with pytest.warns(cc.PluginLoadWarning, match=r"'forgot'.*register_conversion\(\).*returned None"):
        registry = fake_site.load()
    assert fake_site.infos(registry)["forgot"].status == "failed"
    assert registry.names() == ["zz_good_copy"]


def test_hook_returning_an_empty_list_contributes_nothing(fake_site: FakeSite) -> None:
    fake_site.install("empty", fake_site.prelude + "@cc.hookimpl\ndef default_rule():\n    return []\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error", cc.PluginLoadWarning)
        registry = fake_site.load()
    info = fake_site.infos(registry)["empty"]
    assert (info.status, info.conversions, info.rules) == ("loaded", (), ())


def test_two_distributions_with_one_entry_point_name(fake_site: FakeSite) -> None:
    """Never first-found-wins: an error naming both distributions and how to choose."""
    fake_site.install(
        "same", fake_site.source(conversions=["zz_same_a"]), dist="fake-same-a", version="1.1", module="fake_cc_a"
    )
    fake_site.install(
        "same", fake_site.source(conversions=["zz_same_b"]), dist="fake-same-b", version="2.2", module="fake_cc_b"
    )
    with pytest.raises(cc.DuplicateConversionError) as info:
        fake_site.load("same")
    message = str(info.value)
    for part in ("'same'", "fake-same-a 1.1", "fake-same-b 2.2", "Uninstall one"):
        assert part in message


def test_one_distribution_seen_twice_on_sys_path_is_fine(fake_site: FakeSite, tmp_path: Any) -> None:
    import shutil

    fake_site.install("twin", fake_site.source(conversions=["zz_twin"]), dist="fake-twin", module="fake_cc_twin")
    copy = tmp_path / "site2"
    shutil.copytree(fake_site.path, copy)
    fake_site.monkeypatch.syspath_prepend(str(copy))
    with warnings.catch_warnings():
        warnings.simplefilter("error", cc.PluginLoadWarning)
        registry = fake_site.load("twin")
    assert [i.status for i in registry.plugins() if i.name == "twin"] == ["loaded"]
    assert registry.names() == ["zz_twin"]


def test_hookimpl_with_unknown_argument_is_isolated(fake_site: FakeSite) -> None:
    fake_site.install("good", good_source(fake_site))
    fake_site.install(
        "badsig",
        fake_site.source(extra="@cc.hookimpl\ndef register_conversion(device):\n    return []\n"),
    )
    with pytest.warns(cc.PluginLoadWarning, match="'badsig'"):
        registry = fake_site.load()
    assert fake_site.infos(registry)["badsig"].status == "failed"
    assert registry.names() == ["zz_good_copy"]


def test_plugin_registering_one_name_twice_fails_whole(fake_site: FakeSite) -> None:
    fake_site.install("good", good_source(fake_site))
    fake_site.install("twice", fake_site.source(conversions=["zz_twice", "zz_twice"]))
    with pytest.warns(cc.PluginLoadWarning, match="'zz_twice' twice"):
        registry = fake_site.load()
    assert fake_site.infos(registry)["twice"].status == "failed"
    assert "zz_twice" not in registry.names()


# --- strict mode ---------------------------------------------------------------------------


def test_strict_mode_turns_a_load_failure_into_plugin_error(
    fake_site: FakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_site.install("good", good_source(fake_site))
    fake_site.install("broken", "raise RuntimeError('kaput')\n", dist="fake-broken-dist", version="4.5")
    monkeypatch.setenv("CONVERSION_CORE_STRICT", "1")
    with pytest.raises(cc.PluginError, match=r"'broken'.*fake-broken-dist 4\.5.*kaput.*CONVERSION_CORE_STRICT"):
        fake_site.load()
    assert issubclass(cc.PluginError, cc.ConversionCoreError)


def test_strict_mode_off_by_default_and_for_zero(fake_site: FakeSite, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_site.install("broken", "raise RuntimeError('kaput')\n")
    monkeypatch.setenv("CONVERSION_CORE_STRICT", "0")
    with pytest.warns(cc.PluginLoadWarning, match="kaput"):
        registry = fake_site.load()
    assert fake_site.infos(registry)["broken"].status == "failed"


# --- duplicates and orphans ----------------------------------------------------------------


def test_duplicate_conversion_name_names_both_plugins_and_how_to_choose(fake_site: FakeSite) -> None:
    fake_site.install("one", fake_site.source(conversions=["zz_shared"]), dist="fake-one-dist", version="1.0")
    fake_site.install("two", fake_site.source(conversions=["zz_shared"]), dist="fake-two-dist", version="2.0")
    with pytest.raises(cc.DuplicateConversionError) as info:
        fake_site.load()
    message = str(info.value)
    for part in ("'zz_shared'", "'one'", "fake-one-dist", "'two'", "fake-two-dist", "CONVERSION_CORE_PLUGINS"):
        assert part in message
    assert isinstance(info.value, cc.ConversionCoreError)
    # choosing one with the allowlist resolves it
    registry = fake_site.load("two")
    assert registry.provider("zz_shared") == "two"


def test_rule_for_unregistered_conversion_is_reported_and_never_selected(fake_site: FakeSite) -> None:
    fake_site.install(
        "orphan",
        fake_site.source(
            conversions=["zz_real"],
            rules=[
                ("zz_nobody", 100, "ghost-rule", "True"),
                ("zz_real", 1, "real-rule", "True"),
            ],
        ),
        dist="fake-orphan",
    )
    with pytest.warns(cc.PluginLoadWarning, match=r"'ghost-rule'.*'orphan'.*fake-orphan.*'zz_nobody'"):
        registry = fake_site.load()
    assert [r.rule.name for r in registry.rules()] == ["real-rule"]
    assert cc.select_default_conversion({"quant_method": "zz_any"}, registry) == "zz_real"
    assert [o.rule for o in cc.explain({"quant_method": "zz_any"}, registry)] == ["real-rule"]


def test_orphan_rule_is_an_error_in_strict_mode(fake_site: FakeSite, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_site.install("orphan", fake_site.source(rules=[("zz_nobody", 1, "ghost-rule", "True")]))
    monkeypatch.setenv("CONVERSION_CORE_STRICT", "1")
    with pytest.raises(cc.PluginError, match="zz_nobody"):
        fake_site.load()


# --- unknown names -------------------------------------------------------------------------


def test_unknown_name_lists_registered_conversions_and_failed_plugins(fake_site: FakeSite) -> None:
    fake_site.install("good", fake_site.source(conversions=["zz_good_copy", "zz_good_other"]))
    fake_site.install("broken", "raise ImportError('needs zz_missing_lib')\n", dist="fake-broken-dist")
    with pytest.warns(cc.PluginLoadWarning):
        registry = fake_site.load()
    with pytest.raises(KeyError) as info:
        registry.get("zz_nope")
    error = info.value
    assert isinstance(error, cc.UnknownConversionError) and isinstance(error, cc.ConversionCoreError)
    message = str(error)
    assert message.startswith("unknown conversion 'zz_nope'")  # not KeyError's repr of the message
    for part in ("zz_good_copy", "zz_good_other", "broken", "fake-broken-dist", "needs zz_missing_lib"):
        assert part in message
