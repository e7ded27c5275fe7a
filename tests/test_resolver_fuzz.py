"""Fuzz the resolver: whatever JSON-like config comes in (odd leaves included), only conversion-core errors come out,
and whatever it picks passes the guards written here independently of the rules.

Top-level strings are left out on purpose: a string that is not a path is a model name, which
would go to the Hugging Face hub (covered by the malformed-config tests for paths instead).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from plan_expectations import built_in_registry

import conversion_core as cc
from conversion_core.selection.config import quantization_config_of

#: CI-sized by default; set CONVERSION_CORE_HYPOTHESIS_EXAMPLES for a longer local run.
EXAMPLES = int(os.environ.get("CONVERSION_CORE_HYPOTHESIS_EXAMPLES", "200"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

PLAUSIBLE_KEYS = [
    "quant_method", "weight_block_size", "fmt", "scale_fmt", "activation_scheme", "quant_format", "expert_dtype",
    "modules_to_not_convert", "ignored_layers", "ignore", "config_groups", "format", "quantization_status",
    "weights", "input_activations", "output_activations", "strategy", "block_structure", "type", "num_bits",
    "dynamic", "symmetric", "group_size", "actorder", "targets", "sparsity_config", "transform_config",
    "quantization_config", "model_type", "architectures", "activation_scale_ub", "kv_cache_scheme",
]  # fmt: skip
PLAUSIBLE_VALUES = [
    "fp8", "compressed-tensors", "fbgemm_fp8", "awq", "gptq", "e4m3", "e5m2", "ue8m0", "float", "float32",
    "dynamic", "static", "cutlass", "channel", "block", "tensor", "token", "group", "float-quantized",
    "pack-quantized", "int", "compressed", "fp4", [128, 128], [64, 64], [128], 8, 4, 128, True, False, None, {}, [],
]  # fmt: skip

keys = st.one_of(st.sampled_from(PLAUSIBLE_KEYS), st.text(max_size=6))
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.sampled_from(PLAUSIBLE_VALUES),
)
# what a quantizer's to_dict() may leave in a config: no rule should crash on them
odd_leaves = st.one_of(st.sets(st.integers(), max_size=3), st.binary(max_size=4), st.just(torch.float16))
json_like = st.recursive(
    scalars | odd_leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.tuples(inner, inner),
        st.dictionaries(keys, inner, max_size=6),
    ),
    max_leaves=24,
)
# dicts shaped like the configs the rules read, with random values in the places that matter
fp8_like = st.fixed_dictionaries(
    {"quant_method": st.sampled_from(["fp8", "fbgemm_fp8"]) | scalars},
    optional={k: st.sampled_from(PLAUSIBLE_VALUES) | json_like for k in PLAUSIBLE_KEYS[1:8]},
)
weights_like = st.fixed_dictionaries(
    {},
    optional={
        k: st.sampled_from(PLAUSIBLE_VALUES) | json_like
        for k in ["type", "num_bits", "strategy", "block_structure", "dynamic", "symmetric", "group_size", "actorder"]
    },
)
group_like = st.fixed_dictionaries(
    {},
    optional={
        "weights": weights_like | json_like,
        "input_activations": weights_like | json_like,
        "format": st.sampled_from(PLAUSIBLE_VALUES),
        "targets": json_like,
    },
)
compressed_tensors_like = st.fixed_dictionaries(
    {"quant_method": st.just("compressed-tensors"), "config_groups": st.dictionaries(st.text(max_size=4), group_like)},
    optional={"format": st.sampled_from(PLAUSIBLE_VALUES), "quantization_status": st.sampled_from(PLAUSIBLE_VALUES)},
)
quantization_configs = st.one_of(json_like, fp8_like, compressed_tensors_like)
configs = st.one_of(
    quantization_configs.filter(lambda c: not isinstance(c, str)),
    st.builds(lambda qc: {"model_type": "llama", "quantization_config": qc}, quantization_configs),
    st.dictionaries(st.integers(), scalars, min_size=1),
)


REGISTRY = built_in_registry()


def _resolve(config):
    """('picked', name) / ('error', exception type): anything else propagates and fails the test."""
    try:
        return "picked", cc.select_default_conversion(config, registry=REGISTRY)
    except cc.ConversionCoreError as exc:
        return "error", type(exc)


def _assert_never_a_wrong_pick(config, name: str) -> None:
    """Guards written from DESIGN.md and the issue, independent of the rules' code."""
    qc = quantization_config_of(config)
    if name == "bf16_cast":
        assert qc == {}, qc
        return
    method = qc.get("quant_method")
    if method == "fp8":
        assert qc.get("fmt") in (None, "e4m3"), qc
        assert qc.get("scale_fmt") != "ue8m0", qc
        assert qc.get("activation_scheme") in (None, "dynamic"), qc
        assert qc.get("expert_dtype") in (None, "fp8"), qc
        block = qc.get("weight_block_size")
        assert block == [128, 128] if name == "fp8_128x128" else block in (None, [128, 128]), qc
    elif method == "compressed-tensors":
        groups = qc["config_groups"]
        for group in groups.values():
            weights = group["weights"]
            assert weights["type"] == "float" and weights["num_bits"] == 8, qc
            assert weights.get("dynamic") in (None, False), qc
            expected = "block" if name == "fp8_128x128" else "channel"
            assert weights["strategy"] == expected, qc
            if name == "fp8_128x128":
                assert weights["block_structure"] == [128, 128], qc
            acts = group.get("input_activations")
            assert acts is None or acts["dynamic"] is True, qc
    else:
        assert (method, name) == ("fbgemm_fp8", "cutlass_fp8_e4m3_per_channel"), qc


def _check(config) -> str:
    missing = {"bf16_cast", "fp8_128x128", "cutlass_fp8_e4m3_per_channel"} - set(REGISTRY.names())
    assert not missing, f"{sorted(missing)} not registered: are the three built-in plugin distributions installed?"
    kind, value = _resolve(config)
    try:
        outcomes = cc.explain(config, registry=REGISTRY)
    except cc.ConfigError:
        assert (kind, value) == ("error", cc.ConfigError)
        return "ConfigError"
    selected = [o.conversion for o in outcomes if o.selected]
    raised = [(o.rule, o.error) for o in outcomes if o.outcome == "raised"]
    assert not raised, f"a built-in rule raised on a validated config: {raised}"
    if kind == "picked":
        assert value in REGISTRY.names()
        assert selected == [value]
        _assert_never_a_wrong_pick(config, value)
        return value
    assert value is cc.NoMatchingConversionError, value
    assert selected == []
    return "no-match"


@SETTINGS
@given(configs)
def test_random_configs_only_raise_conversion_core_errors(config):
    _check(config)


CORPUS_DIR = Path(__file__).parent / "data" / "quantization_configs"
CORPUS = [json.loads(p.read_text()) for p in sorted(CORPUS_DIR.glob("*.json"))]


def _paths(value, prefix=()):
    """Every (path, value) inside a nested dict/list."""
    yield prefix, value
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


@st.composite
def mutated_real_configs(draw):
    """A real corpus config with one place replaced, deleted, or given an extra key."""
    entry = draw(st.sampled_from(CORPUS))
    config = copy.deepcopy(entry["config"])
    places = [p for p, _ in _paths(config) if p]
    path = draw(st.sampled_from(places))
    *parent_path, last = path
    parent = config
    for step in parent_path:
        parent = parent[step]
    action = draw(st.sampled_from(["replace", "delete", "add"]))
    if action == "replace":
        parent[last] = draw(st.sampled_from(PLAUSIBLE_VALUES) | json_like)
    elif action == "delete" and isinstance(parent, dict):
        del parent[last]
    elif isinstance(parent, dict):
        parent[draw(keys)] = draw(st.sampled_from(PLAUSIBLE_VALUES) | json_like)
    form = draw(st.sampled_from(["whole", "bare"]))
    if form == "bare" and isinstance(config.get("quantization_config"), dict):
        return config["quantization_config"]
    return config


@SETTINGS
@given(mutated_real_configs())
def test_mutated_real_configs_never_pick_wrong(config):
    _check(config)
