"""Resolution order, raising predicates, ``explain`` and the no-match error."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
import torch

import conversion_core as cc

FakeSite = Any  # the fake_site fixture's type lives in conftest.py

ZZ = {"quant_method": "zz_method"}


def test_priority_beats_registration_and_plugin_order(fake_site: FakeSite) -> None:
    # "aaa" sorts first and lists its low-priority rule first: priority must still decide
    fake_site.install(
        "aaa",
        fake_site.source(
            conversions=["zz_low", "zz_mid"],
            rules=[
                ("zz_low", 10, "aaa-low", "qc.get('quant_method') == 'zz_method'"),
                ("zz_mid", 20, "aaa-mid", "qc.get('quant_method') == 'zz_method'"),
            ],
        ),
    )
    fake_site.install(
        "zzz",
        fake_site.source(
            conversions=["zz_high"], rules=[("zz_high", 50, "zzz-high", "qc.get('quant_method') == 'zz_method'")]
        ),
    )
    registry = fake_site.load()
    assert [(r.plugin, r.rule.name) for r in registry.rules()] == [
        ("zzz", "zzz-high"),
        ("aaa", "aaa-mid"),
        ("aaa", "aaa-low"),
    ]
    assert cc.select_default_conversion(ZZ, registry) == "zz_high"
    assert cc.select_default_conversion(ZZ) == "zz_high"  # the cached registry by default


@pytest.mark.parametrize("install_order", [("bbb", "aaa"), ("aaa", "bbb")])
def test_ties_break_by_plugin_name_then_plugin_order(fake_site: FakeSite, install_order: tuple[str, str]) -> None:
    for name in install_order:
        fake_site.install(
            name,
            fake_site.source(
                conversions=[f"zz_{name}_first", f"zz_{name}_second"],
                rules=[
                    (f"zz_{name}_first", 7, f"{name}-first", "True"),
                    (f"zz_{name}_second", 7, f"{name}-second", "True"),
                ],
            ),
        )
    registry = fake_site.load()
    outcomes = cc.explain(ZZ, registry)
    assert [(o.plugin, o.rule) for o in outcomes] == [
        ("aaa", "aaa-first"),
        ("aaa", "aaa-second"),
        ("bbb", "bbb-first"),
        ("bbb", "bbb-second"),
    ]
    assert cc.select_default_conversion(ZZ, registry) == "zz_aaa_first"


@pytest.fixture
def mixed(fake_site: FakeSite) -> cc.Registry:
    """A raising rule on top, a non-matching one, two matching ones below."""
    fake_site.install(
        "mix",
        fake_site.source(
            conversions=["zz_raiser", "zz_other", "zz_winner", "zz_runner_up"],
            rules=[
                ("zz_raiser", 90, "raiser", "qc['zz_key_that_is_absent'] == 1"),
                ("zz_other", 80, "other", "qc.get('quant_method') == 'zz_something_else'"),
                ("zz_winner", 70, "winner", "qc.get('quant_method') == 'zz_method'"),
                ("zz_runner_up", 60, "runner-up", "qc.get('quant_method') == 'zz_method'"),
            ],
        ),
    )
    return fake_site.load()


def test_raising_predicate_is_skipped_and_logged_at_debug(mixed: cc.Registry, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="conversion_core"):
        assert cc.select_default_conversion(ZZ, mixed) == "zz_winner"
    debug = [r for r in caplog.records if r.levelno == logging.DEBUG and "raiser" in r.getMessage()]
    assert debug and "zz_key_that_is_absent" in debug[0].getMessage()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_explain_lists_every_rule_in_order_with_outcomes(mixed: cc.Registry) -> None:
    outcomes = cc.explain(ZZ, mixed)
    assert [(o.plugin, o.rule, o.conversion, o.priority, o.outcome, o.selected) for o in outcomes] == [
        ("mix", "raiser", "zz_raiser", 90, "raised", False),
        ("mix", "other", "zz_other", 80, "no match", False),
        ("mix", "winner", "zz_winner", 70, "matched", True),
        ("mix", "runner-up", "zz_runner_up", 60, "matched", False),
    ]
    assert isinstance(outcomes[0].error, KeyError) and "zz_key_that_is_absent" in str(outcomes[0].error)
    assert all(o.error is None for o in outcomes[1:])


def test_predicates_get_a_private_plain_dict(fake_site: FakeSite) -> None:
    fake_site.install(
        "spoiler",
        fake_site.source(
            conversions=["zz_spoiler", "zz_victim"],
            extra="""
            SEEN = []

            def spoil(qc):
                SEEN.append(qc)
                qc["quant_method"] = "zz_spoiled"
                qc.clear()
                return False

            def victim(qc):
                SEEN.append(qc)
                return qc.get("quant_method") == "zz_method"

            @cc.hookimpl
            def default_rule():
                return [cc.Rule("zz_spoiler", spoil, 2, "spoiler"), cc.Rule("zz_victim", victim, 1, "victim")]
            """,
        ),
    )
    registry = fake_site.load()
    config = {"quant_method": "zz_method", "weight_block_size": [1, 2]}
    assert cc.select_default_conversion(config, registry) == "zz_victim"
    assert config == {"quant_method": "zz_method", "weight_block_size": [1, 2]}  # the caller's dict untouched
    seen = fake_site.module("spoiler").SEEN
    assert type(seen[1]) is dict and seen[1] == config


def test_non_bool_predicate_result_is_reported_not_silently_ignored(fake_site: FakeSite) -> None:
    """``qc.get("a") and [1]`` returns a list: neither a silent match nor a silent no-match."""
    fake_site.install(
        "truthy",
        fake_site.source(
            conversions=["zz_truthy", "zz_fallback"],
            rules=[
                ("zz_truthy", 5, "truthy", "qc.get('quant_method') and [1]"),
                ("zz_fallback", 1, "fallback", "True"),
            ],
        ),
    )
    registry = fake_site.load()
    first, second = cc.explain(ZZ, registry)
    assert (first.rule, first.outcome, first.selected) == ("truthy", "raised", False)
    assert isinstance(first.error, TypeError)
    assert "list" in str(first.error) and "bool" in str(first.error)
    assert (second.rule, second.outcome, second.selected) == ("fallback", "matched", True)
    assert cc.select_default_conversion(ZZ, registry) == "zz_fallback"


def test_no_match_shows_the_quantization_config_and_every_rule(mixed: cc.Registry) -> None:
    config = {"model_type": "zz_model", "quantization_config": {"quant_method": "zz_unheard_of", "bits": 3}}
    with pytest.raises(cc.NoMatchingConversionError) as info:
        cc.select_default_conversion(config, mixed)
    assert isinstance(info.value, ValueError) and isinstance(info.value, cc.ConversionCoreError)
    message = str(info.value)
    assert json.dumps({"bits": 3, "quant_method": "zz_unheard_of"}) in message
    for rule, conversion in [("raiser", "zz_raiser"), ("other", "zz_other"), ("winner", "zz_winner")]:
        assert f"{rule} -> {conversion}" in message
    assert "KeyError" in message  # the raising rule says why
    assert "zz_runner_up" in message  # the registered conversions are listed


def test_no_rules_at_all(fake_site: FakeSite, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVERSION_CORE_PLUGINS", "")
    registry = cc.load_registry(reload=True)
    assert cc.explain({}, registry) == []
    with pytest.raises(cc.NoMatchingConversionError, match=r"(?s)no rules are registered.*CONVERSION_CORE_PLUGINS"):
        cc.select_default_conversion({}, registry)


def test_no_match_error_survives_values_json_cannot_encode(fake_site: FakeSite) -> None:
    fake_site.install("strict", fake_site.source(conversions=["zz_never"], rules=[("zz_never", 1, "never", "False")]))
    registry = fake_site.load()
    with pytest.raises(
        cc.NoMatchingConversionError, match=r"\"dtype\": \"torch\.float16\", \"quant_method\": \"zz_odd\""
    ):
        cc.select_default_conversion({"quant_method": "zz_odd", "dtype": torch.float16}, registry)
