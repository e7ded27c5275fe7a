"""Module selection keys read as the engines read them (conversion_core.formats.modules).

Expected outcomes come from reading: transformers 5.24 quantizers_utils.should_convert_module (regex
from the start up to a module boundary, or str.endswith); vLLM quant_utils.is_layer_skipped (exact
path, fused shards must agree, experts branch); compressed-tensors utils/match.py match_name /
is_match (re: -> re.match, else equality; class names via the MRO).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import conversion_core as cc
from conversion_core.formats.modules import compressed_tensors_keep, hf_fp8_keep, module_keep, transformers_skips

FP8 = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
CT = {"quant_method": "compressed-tensors", "config_groups": {"g": {"targets": ["Linear"]}}}


def fp8(**kw):
    return hf_fp8_keep({**FP8, **kw})


def ct(targets=("Linear",), ignore=()):
    return compressed_tensors_keep({**CT, "config_groups": {"g": {"targets": list(targets)}}, "ignore": list(ignore)})


def test_gate_does_not_match_gate_proj_but_full_router_path_does():
    # transformers: "gate" endswith-matches "...mlp.gate" -> skip; vLLM: exact path "...mlp.gate" != "gate"
    # -> converts: the engines disagree on a bare "gate", so it is refused.
    with pytest.raises(cc.ConfigError, match="'gate'"):
        fp8(modules_to_not_convert=["gate"])("model.layers.0.mlp.gate.weight")
    keep = fp8(modules_to_not_convert=["model.layers.0.mlp.gate"])
    assert (
        keep("model.layers.0.mlp.gate.weight") == "ignored by config: modules_to_not_convert 'model.layers.0.mlp.gate'"
    )
    assert keep("model.layers.0.mlp.gate_proj.weight") is None  # boundary: not gate_proj (both engines)
    assert keep("model.layers.1.mlp.gate.weight") is None


def test_mlp_gate_suffix_entry_in_moe_is_refused_because_vllm_matches_paths_exactly():
    with pytest.raises(cc.ConfigError, match="transformers skips"):
        fp8(ignored_layers=["mlp.gate"])("model.layers.3.mlp.gate.weight")
    assert fp8(ignored_layers=["mlp.gate"])("model.layers.3.mlp.down_proj.weight") is None


def test_fused_qkv_with_only_q_ignored_is_refused_like_vllm():
    # vLLM is_layer_skipped raises "Detected some but not all shards of ... are quantized".
    keep = fp8(modules_to_not_convert=["model.layers.0.self_attn.q_proj"])
    with pytest.raises(cc.ConfigError, match="fused layer"):
        keep("model.layers.0.self_attn.k_proj.weight")
    # A model without fused qkv (fused={}) decides per module.
    keep = hf_fp8_keep({**FP8, "modules_to_not_convert": ["model.layers.0.self_attn.q_proj"]}, fused={})
    assert keep("model.layers.0.self_attn.q_proj.weight").startswith("ignored by config")
    assert keep("model.layers.0.self_attn.k_proj.weight") is None
    with pytest.raises(cc.ConfigError, match="fused layer"):
        ct(ignore=["re:.*q_proj$"])("model.layers.0.self_attn.v_proj.weight")


def test_all_shards_ignored_is_fine():
    names = [f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]
    keep = fp8(modules_to_not_convert=names)
    assert all(keep(n + ".weight") for n in names)


def test_re_lm_head_in_compressed_tensors_and_in_hf_lists():
    keep = ct(ignore=["re:.*lm_head"])
    assert keep("lm_head.weight") == "ignored by config: ignore 're:.*lm_head'"
    assert keep("model.layers.0.mlp.down_proj.weight") is None
    with pytest.raises(cc.ConfigError, match="compressed-tensors syntax"):
        fp8(modules_to_not_convert=["re:.*lm_head"])


def test_modules_to_convert_is_refused():
    # transformers replace_with_fp8_embedding quantizes embeddings named by it; vLLM fp8 ignores the key.
    with pytest.raises(cc.ConfigError, match="modules_to_convert"):
        fp8(modules_to_convert=["embed_tokens"])
    assert fp8(modules_to_convert=None)("model.layers.0.mlp.up_proj.weight") is None


def test_both_skip_keys_must_agree():
    with pytest.raises(cc.ConfigError, match="differ"):
        fp8(modules_to_not_convert=["lm_head"], ignored_layers=["model.layers.0.mlp.gate"])


def test_targets_linear_versus_regex():
    assert ct(["Linear"])("model.layers.0.self_attn.o_proj.weight") is None
    keep = ct(["re:.*mlp.*"])
    assert keep("model.layers.0.mlp.down_proj.weight") is None
    assert keep("model.layers.0.self_attn.o_proj.weight") == "not in config_groups targets"
    with pytest.raises(cc.ConfigError, match="Attention"):
        ct(["Attention"])
    with pytest.raises(cc.ConfigError, match="MoEGate"):
        ct(ignore=["MoEGate"])


def test_per_expert_names():
    name = "model.layers.0.mlp.experts.3.gate_proj.weight"
    keep = fp8(modules_to_not_convert=["model.layers.0.mlp.experts"])
    assert keep(name).startswith("ignored by config")  # transformers prefix at a boundary; vLLM experts branch
    assert keep("model.layers.0.mlp.experts.gate_up_proj").startswith("ignored by config")
    assert keep("model.layers.1.mlp.experts.3.gate_proj.weight") is None
    assert ct(ignore=["re:.*experts\\.3\\..*"])(name).startswith("ignored by config")
    with pytest.raises(cc.ConfigError, match="fused"):
        ct(ignore=["model.layers.0.mlp.experts.3.gate_proj"])(name)


def test_transformers_matching_rules():
    assert transformers_skips("model.layers.1.attn", "model.layers.1")
    assert not transformers_skips("model.layers.11.attn", "model.layers.1")
    assert transformers_skips("model.layers.11.attn", "model.layers.*")
    assert transformers_skips("model.decoder.layers.23.fc1", "fc1")
    assert transformers_skips("model.layers.0.self_attn.q_proj", "proj")  # endswith has no boundary


dotted = st.lists(
    st.sampled_from(["model", "layers", "0", "1", "mlp", "gate", "gate_proj", "q_proj"]), min_size=1, max_size=5
).map(".".join)


@given(dotted)
def test_an_exact_module_path_is_always_kept(module):
    keep = hf_fp8_keep({**FP8, "modules_to_not_convert": [module]}, fused={})
    try:
        assert keep(module + ".weight") is not None
    except cc.ConfigError:
        assert "experts" in module


@given(dotted, dotted)
def test_compressed_tensors_plain_entries_are_equality(module, entry):
    keep = compressed_tensors_keep({**CT, "ignore": [entry]}, fused={})
    assert (keep(module + ".weight") is not None) == (module == entry)


CORPUS = sorted((Path(__file__).parent / "data" / "quantization_configs").glob("*.json"))
REFUSED = {"gpt_oss_20b_mxfp4"}  # not an fp8/ct family: module_keep returns None


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.stem)
def test_corpus_configs_load(path):
    qc = (json.loads(path.read_text())["config"] or {}).get("quantization_config") or {}
    keep = module_keep(qc)
    if keep is None:
        return
    for n in ("model.layers.0.self_attn.o_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        keep(n)
