"""The seed's dispatch cases over the installed built-in plugins (issue 3, "Must show").

Each case names the conversions it needs; it is skipped when a plugin providing one of them
is not installed (or not allowed by CONVERSION_CORE_PLUGINS), so this file runs in every nox
session. The cases that need a single plugin are also in that plugin's own tests.
"""

from __future__ import annotations

import pytest

import conversion_core as cc

BF16, DEEPGEMM, CUTLASS = "bf16_cast", "fp8_128x128", "cutlass_fp8_e4m3_per_channel"


@pytest.fixture
def registry() -> cc.Registry:
    return cc.load_registry(reload=True)


def needs(registry: cc.Registry, *names: str) -> None:
    missing = [n for n in names if n not in registry.names()]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (plugin not installed or not allowed)")


SEED_CASES = [
    ("no-quantization", {"model_type": "llama"}, BF16, [BF16]),
    ("block-128x128", {"quant_method": "fp8", "weight_block_size": [128, 128]}, DEEPGEMM, [DEEPGEMM]),
    ("quant_format-cutlass", {"quant_method": "fp8", "quant_format": "cutlass"}, CUTLASS, [CUTLASS]),
    ("no-blocks-dynamic", {"quant_method": "fp8", "activation_scheme": "dynamic"}, CUTLASS, [CUTLASS]),
    (
        "both-fp8-rules-match-deepgemm-wins",
        {"quant_method": "fp8", "quant_format": "cutlass", "weight_block_size": [128, 128]},
        DEEPGEMM,
        [DEEPGEMM, CUTLASS],
    ),
    (
        "deepseek-v3-config-with-all-three",
        {
            "model_type": "deepseek_v3",
            "quantization_config": {
                "quant_method": "fp8",
                "fmt": "e4m3",
                "activation_scheme": "dynamic",
                "weight_block_size": [128, 128],
            },
        },
        DEEPGEMM,
        [BF16, DEEPGEMM, CUTLASS],
    ),
    ("unquantized-with-all-three", {}, BF16, [BF16, DEEPGEMM, CUTLASS]),
]


@pytest.mark.parametrize(
    ("config", "expected", "required"), [c[1:] for c in SEED_CASES], ids=[c[0] for c in SEED_CASES]
)
def test_seed_dispatch(registry: cc.Registry, config: dict, expected: str, required: list[str]) -> None:
    needs(registry, *required)
    assert cc.select_default_conversion(config, registry) == expected


def test_both_fp8_rules_match_and_deepgemm_outranks_cutlass(registry: cc.Registry) -> None:
    needs(registry, DEEPGEMM, CUTLASS)
    qc = {"quant_method": "fp8", "quant_format": "cutlass", "weight_block_size": [128, 128]}
    outcomes = cc.explain(qc, registry)
    matched = [o for o in outcomes if o.outcome == "matched"]
    assert {o.conversion for o in matched} >= {DEEPGEMM, CUTLASS}
    (selected,) = [o for o in outcomes if o.selected]
    assert (selected.conversion, selected.priority, selected.plugin) == (DEEPGEMM, 200, "deepgemm_fp8")
    cutlass = [o for o in matched if o.conversion == CUTLASS]
    assert all(o.priority == 100 and not o.selected for o in cutlass)


def test_unknown_quant_method_lists_the_registered_conversions(registry: cc.Registry) -> None:
    if not registry.names():
        pytest.skip("no plugin installed or allowed")
    config = {"model_type": "llama", "quantization_config": {"quant_method": "awq", "bits": 4}}
    with pytest.raises(cc.NoMatchingConversionError) as info:
        cc.select_default_conversion(config, registry)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert '"quant_method": "awq"' in message
    for name in registry.names():
        assert name in message
    for entry in registry.rules():
        assert f"{entry.plugin}  {entry.label} -> {entry.rule.conversion}: no match" in message
