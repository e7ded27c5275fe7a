"""``Rule.validate``: a plugin refuses a malformed key it claims; a broken validator spares the rest.

The core validates no format's keys (tests/core/test_core_layers.py holds that), so this is the
only path by which a malformed key becomes an error rather than a silent "no match".
"""

from __future__ import annotations

from typing import Any

import pytest

import conversion_core as cc

FakeSite = Any

VALIDATORS = """
def claims_bits(qc):
    if "zz_bits" in qc and not isinstance(qc["zz_bits"], int):
        raise cc.ConfigError(f"quantization_config['zz_bits'] must be an int, got {qc['zz_bits']!r}")

def buggy(qc):
    raise RuntimeError("validator bug")

def exits(qc):
    raise SystemExit(0)
"""


def install(site: FakeSite, validator: str) -> None:
    site.install(
        "validating",
        site.prelude + VALIDATORS + "@cc.hookimpl\ndef register_conversion():\n"
        "    return [cc.Conversion('zz_v', copy_fn, False, dst_dtype=torch.float32),\n"
        "            cc.Conversion('zz_other', copy_fn, False, dst_dtype=torch.float32)]\n"
        "@cc.hookimpl\ndef default_rule():\n"
        f"    return [cc.Rule('zz_v', lambda qc: qc.get('quant_method') == 'zz', 9, 'v-rule', validate={validator}),\n"
        "            cc.Rule('zz_other', lambda qc: True, 1, 'fallback')]\n",
    )


def test_a_malformed_claimed_key_is_a_config_error_naming_key_rule_and_plugin(fake_site: FakeSite) -> None:
    install(fake_site, "claims_bits")
    registry = fake_site.load()
    for call in (cc.select_default_conversion, cc.explain):
        with pytest.raises(cc.ConfigError, match=r"'zz_bits'.*must be an int.*'v-rule'.*'validating'"):
            call({"quant_method": "anything", "zz_bits": "4"}, registry)
    assert cc.select_default_conversion({"quant_method": "zz", "zz_bits": 4}, registry) == "zz_v"


@pytest.mark.parametrize("validator", ["buggy", "exits"])
def test_a_broken_validator_counts_as_raised_for_its_rule_only(fake_site: FakeSite, validator: str) -> None:
    install(fake_site, validator)
    registry = fake_site.load()
    outcomes = {o.rule: o for o in cc.explain({"quant_method": "zz"}, registry)}
    assert outcomes["v-rule"].outcome == "raised" and outcomes["fallback"].outcome == "matched"
    assert cc.select_default_conversion({"quant_method": "zz"}, registry) == "zz_other"


def test_validate_must_be_callable() -> None:
    with pytest.raises(cc.ConversionTypeError, match="validate must be callable"):
        cc.Rule("x", lambda qc: True, validate="no")  # type: ignore[arg-type]
