"""The plugin's rules read compressed-tensors MX configs and refuse what the bytes cannot honour."""

from __future__ import annotations

import copy

import pytest
from conversion_core_mx import config

import conversion_core as cc


def mx_config(fmt: str) -> dict:
    return config.default_config(fmt, ["lm_head"])


@pytest.fixture(scope="module")
def registry() -> cc.Registry:
    return cc.load_registry(reload=True)


@pytest.mark.parametrize(("fmt", "name"), [("mxfp8-quantized", "mxfp8"), ("mxfp4-pack-quantized", "mxfp4")])
def test_configs_select_the_conversion(registry, fmt, name):
    qc = mx_config(fmt)
    assert cc.select_default_conversion(qc, registry) == name
    assert cc.select_default_conversion({"quantization_config": qc, "model_type": "llama"}, registry) == name
    weight_only = copy.deepcopy(qc)
    for group in weight_only["config_groups"].values():
        group["input_activations"] = None
    assert cc.select_default_conversion(weight_only, registry) == name
    outcomes = {(o.plugin, o.rule): o.outcome for o in cc.explain(qc, registry)}
    assert outcomes[("mx", f"compressed-tensors-{name}")] == "matched"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda g: g["weights"].update(group_size=16), "group_size is 16, expected 32"),
        (lambda g: g["weights"].update(group_size=64), "group_size is 64"),
        (lambda g: g["weights"].update(strategy="tensor_group"), "strategy"),
        (lambda g: g["weights"].update(scale_dtype="torch.float8_e4m3fn"), "scale_dtype"),
        (lambda g: g["weights"].update(symmetric=False), "symmetric"),
        (lambda g: g["weights"].update(dynamic=True), "dynamic"),
        (lambda g: g["weights"].update(num_bits=4), "num_bits is 4, expected 8"),
        (lambda g: g["input_activations"].update(dynamic=False), "static activations"),
        (lambda g: g.update(output_activations={"num_bits": 8}), "output_activations"),
    ],
)
def test_unservable_mx_configs_are_refused_with_the_key(registry, edit, message):
    qc = mx_config("mxfp8-quantized")
    edit(qc["config_groups"]["MXFP8"])
    with pytest.raises(cc.NoMatchingConversionError, match=message):
        cc.select_default_conversion(qc, registry)
    mine = [o for o in cc.explain(qc, registry) if o.plugin == "mx"]
    assert {o.outcome for o in mine} == {"raised"}


def test_kv_cache_scheme_refused(registry):
    qc = mx_config("mxfp4-pack-quantized")
    qc["kv_cache_scheme"] = {"num_bits": 8, "type": "float"}
    with pytest.raises(cc.NoMatchingConversionError, match="kv_cache_scheme"):
        cc.select_default_conversion(qc, registry)


def test_other_configs_are_not_claimed(registry):
    for qc in [{}, {"quant_method": "fp8", "weight_block_size": [128, 128]}, {"quant_method": "compressed-tensors"}]:
        assert all(o.outcome == "no match" for o in cc.explain(qc, registry) if o.plugin == "mx")


def test_target_format_keeps_the_config_and_adds_kept_modules():
    from conversion_core_mx import MXFP4_CONVERSION

    qc = mx_config("mxfp4-pack-quantized")
    tf = MXFP4_CONVERSION.target_format(qc)
    written = tf.quantization_config(["model.embed_tokens"])
    assert written["ignore"] == ["lm_head", "model.embed_tokens"]
    assert written["format"] == "mxfp4-pack-quantized"
    assert tf.keep("lm_head.weight") is not None and tf.keep("model.layers.0.mlp.up_proj.weight") is None
    assert (
        MXFP4_CONVERSION.target_format({}).quantization_config([])["config_groups"]["MXFP4"]["weights"]["num_bits"] == 4
    )
