"""Every config form the resolver accepts reaches the predicates as the same plain dict."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import conversion_core as cc

FakeSite = Any  # the fake_site fixture's type lives in conftest.py

QC = {"quant_method": "zz_form", "weight_block_size": [64, 64]}
WHOLE = {"model_type": "llama", "hidden_size": 8, "quantization_config": QC}


@pytest.fixture
def forms(fake_site: FakeSite) -> FakeSite:
    """A plugin that records what its predicates receive."""
    fake_site.install(
        "forms",
        fake_site.source(
            conversions=["zz_form_quant", "zz_form_plain"],
            extra="""
            SEEN = []

            def is_zz(qc):
                SEEN.append(qc)
                return qc.get("quant_method") == "zz_form"

            @cc.hookimpl
            def default_rule():
                return [cc.Rule("zz_form_quant", is_zz, 10, "zz-form"),
                        cc.Rule("zz_form_plain", lambda qc: qc == {}, 0, "zz-plain")]
            """,
        ),
    )
    fake_site.load()
    return fake_site


def _select(site: FakeSite, config: Any) -> tuple[str, Any]:
    seen = site.module("forms").SEEN
    seen.clear()
    name = cc.select_default_conversion(config)
    return name, seen[0]


def _assert_quantized(site: FakeSite, config: Any) -> None:
    name, seen = _select(site, config)
    assert name == "zz_form_quant"
    assert type(seen) is dict and seen == {"quant_method": "zz_form", "weight_block_size": [64, 64]}


def _assert_plain(site: FakeSite, config: Any) -> None:
    name, seen = _select(site, config)
    assert name == "zz_form_plain"
    assert type(seen) is dict and seen == {}


def test_whole_config_dict(forms: FakeSite) -> None:
    _assert_quantized(forms, WHOLE)
    _assert_plain(forms, {"model_type": "llama", "hidden_size": 8})
    _assert_plain(forms, {"architectures": ["LlamaForCausalLM"], "quantization_config": None})


def test_bare_quantization_config_dict(forms: FakeSite) -> None:
    _assert_quantized(forms, QC)


def test_empty_dict_means_no_quantization(forms: FakeSite) -> None:
    _assert_plain(forms, {})


def test_dict_that_is_neither_form_is_refused(forms: FakeSite) -> None:
    with pytest.raises(cc.ConfigError) as info:
        cc.select_default_conversion({"hidden_size": 8})
    assert isinstance(info.value, ValueError) and "quant_method" in str(info.value)


def test_pretrained_config(forms: FakeSite) -> None:
    transformers = pytest.importorskip("transformers")
    _assert_quantized(forms, transformers.PretrainedConfig(quantization_config=dict(QC)))
    _assert_plain(forms, transformers.PretrainedConfig())


def test_path_to_config_json(forms: FakeSite, tmp_path: Path) -> None:
    path = tmp_path / "my-config.json"
    path.write_text(json.dumps(WHOLE), encoding="utf-8")
    _assert_quantized(forms, path)
    _assert_quantized(forms, str(path))


def test_model_directory(forms: FakeSite, tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(WHOLE), encoding="utf-8")
    _assert_quantized(forms, model)
    _assert_quantized(forms, str(model))


def test_missing_path_is_a_config_error(forms: FakeSite, tmp_path: Path) -> None:
    with pytest.raises(cc.ConfigError, match="does not exist"):
        cc.select_default_conversion(tmp_path / "nowhere" / "config.json")


def test_model_name_through_autoconfig_without_remote_code(forms: FakeSite, monkeypatch: pytest.MonkeyPatch) -> None:
    transformers = pytest.importorskip("transformers")
    calls: list[tuple[Any, dict[str, Any]]] = []

    def fake_from_pretrained(name: Any, **kwargs: Any) -> Any:
        calls.append((name, kwargs))
        return transformers.PretrainedConfig(quantization_config=dict(QC))

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", fake_from_pretrained)
    _assert_quantized(forms, "zz-org/zz-model")
    assert len(calls) == 1
    name, kwargs = calls[0]
    assert name == "zz-org/zz-model"
    assert kwargs.get("trust_remote_code") is False


def test_explain_accepts_the_same_forms(forms: FakeSite, tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(WHOLE), encoding="utf-8")
    for config in (WHOLE, QC, path, tmp_path):
        selected = [o.conversion for o in cc.explain(config) if o.selected and o.plugin == "forms"]
        assert selected == ["zz_form_quant"]
