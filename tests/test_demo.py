"""``conversion-core demo`` and the configs shipped for it."""

from __future__ import annotations

import json
import math
import sys

import pytest
from plan_expectations import needs_builtin_plugins

import conversion_core as cc
from conversion_core.apps.cli import main
from conversion_core.apps.demo import INFERENCE_CONFIGS, MODEL_CONFIG, build_model_state, data_path, run_demo


@needs_builtin_plugins
def test_shipped_configs_are_package_data_and_resolve_to_both_fp8_formats():
    model = json.loads(data_path(MODEL_CONFIG).read_text())
    assert model["model_type"] == "qwen3_moe"
    assert model["moe_intermediate_size"] % 128 != 0  # exercises partial blocks and the gate/up boundary
    assert cc.select_default_conversion(data_path(INFERENCE_CONFIGS["block"])) == "fp8_128x128"
    assert cc.select_default_conversion(data_path(INFERENCE_CONFIGS["channel"])) == "cutlass_fp8_e4m3_per_channel"


@needs_builtin_plugins
@pytest.mark.parametrize("fmt", ["block", "channel"])
def test_demo_converts_the_shipped_model(fmt):
    pytest.importorskip("transformers")
    model = json.loads(data_path(MODEL_CONFIG).read_text())
    report, plan = run_demo(data_path(INFERENCE_CONFIGS[fmt]))
    assert report.ok and report.buffers_reused and report.refused_by_other
    assert report.accepted == report.outputs == len(plan.outputs)
    layers, experts = model["num_hidden_layers"], model["num_experts"]
    inter, hidden = model["moe_intermediate_size"], model["hidden_size"]
    # transformers 5 fuses experts into (E, 2I, H) / (E, H, I); 4.x keeps one 2-D tensor per expert
    fused = [e for e in plan.quantized if e.name.endswith("experts.gate_up_proj")]
    per_expert = 3 * experts if not fused else 2
    assert report.quantized == layers * (4 + per_expert)  # q, k, v, o + experts; router gates kept
    assert report.kept["router gate"] == layers and report.kept["embedding"] == 1 and report.kept["lm_head"] == 1
    if fused and fmt == "block":
        for entry in fused:
            assert entry.src_shape == (experts, 2 * inter, hidden)
            assert entry.scale_shape == (experts, 2 * math.ceil(inter / 128), math.ceil(hidden / 128))
            assert entry.scale_name.endswith("gate_up_proj_scale_inv")
    if fmt == "channel":  # compressed-tensors: every scale is weight_scale, per-row scales stored (N, 1)
        q = plan["model.layers.0.self_attn.q_proj.weight"]
        assert q.scale_name.endswith("q_proj.weight_scale") and q.scale_shape == (q.src_shape[0], 1)


@needs_builtin_plugins
def test_demo_command_prints_the_table(capsys):
    pytest.importorskip("transformers")
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    for row in ("tensors quantized", "tensors kept", "bytes in / out", "convert time", "max dequantize error"):
        assert row in out
    assert "fp8_128x128 [deep_gemm_fp8]" in out


def test_demo_without_transformers_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(cc.ConfigError, match=r"conversion-core\[hf\]"):
        build_model_state({"model_type": "qwen3_moe"})
    assert main(["demo"]) == 1
    assert "conversion-core[hf]" in capsys.readouterr().err
