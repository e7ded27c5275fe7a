"""Real published ``quantization_config`` blocks resolve to what an inference engine would load.

Each file in ``data/quantization_configs/`` holds one config (with where it came from) and the
expected outcome: a conversion name, or ``"no-match"`` for formats no installed plugin can
produce bytes for. Every entry is resolved through every accepted config form.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from plan_expectations import BUILTIN, built_in_registry

import conversion_core as cc

CORPUS_DIR = Path(__file__).parent / "data" / "quantization_configs"
ENTRIES = sorted(CORPUS_DIR.glob("*.json"))


@pytest.fixture(scope="module")
def registry() -> cc.Registry:
    """The three built-in plugins only, so other installed plugins cannot change the expected picks."""
    registry = built_in_registry()
    missing = BUILTIN - set(registry.names())
    assert not missing, f"{sorted(missing)} not registered: are the three built-in plugin distributions installed?"
    return registry


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _forms(config: dict, tmp_path: Path) -> dict[str, object]:
    """The same model config in every form ``select_default_conversion`` accepts."""
    (tmp_path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return {
        "whole config dict": config,
        "bare quantization_config": config.get("quantization_config") or {},
        "path to config.json": str(tmp_path / "config.json"),
        "model directory": tmp_path,
    }


def test_corpus_is_not_empty_and_well_formed():
    assert len(ENTRIES) >= 20
    for path in ENTRIES:
        entry = _load(path)
        assert entry["name"] == path.stem
        assert entry["source"] and entry["found_via"] and entry["why"]
        assert entry["expected"] == "no-match" or entry["expected"] in BUILTIN, path.name
        assert set(entry["config"]) & {"model_type", "architectures"}, path.name


def test_corpus_covers_every_outcome():
    outcomes = {_load(path)["expected"] for path in ENTRIES}
    assert {"fp8_128x128", "cutlass_fp8_e4m3_per_channel", "bf16_cast", "no-match"} <= outcomes


@pytest.mark.parametrize("path", ENTRIES, ids=[p.stem for p in ENTRIES])
def test_real_config_resolves_as_expected(path: Path, tmp_path: Path, registry: cc.Registry):
    entry = _load(path)
    for form, config in _forms(entry["config"], tmp_path).items():
        if entry["expected"] == "no-match":
            with pytest.raises(cc.NoMatchingConversionError) as excinfo:
                cc.select_default_conversion(config, registry=registry)
            message = str(excinfo.value)
            assert entry["config"]["quantization_config"]["quant_method"] in message, form
            assert "fp8_128x128" in message and "cutlass_fp8_e4m3_per_channel" in message, form
            assert not any(o.selected for o in cc.explain(config, registry=registry)), form
        else:
            assert cc.select_default_conversion(config, registry=registry) == entry["expected"], form
            selected = [o for o in cc.explain(config, registry=registry) if o.selected]
            assert [o.conversion for o in selected] == [entry["expected"]], form


@pytest.mark.parametrize("path", ENTRIES, ids=[p.stem for p in ENTRIES])
def test_real_config_through_pretrained_config(path: Path, registry: cc.Registry):
    transformers = pytest.importorskip("transformers")
    entry = _load(path)
    qc = entry["config"].get("quantization_config")
    config = transformers.PretrainedConfig(**({"quantization_config": qc} if qc else {}))
    if entry["expected"] == "no-match":
        with pytest.raises(cc.NoMatchingConversionError):
            cc.select_default_conversion(config, registry=registry)
    else:
        assert cc.select_default_conversion(config, registry=registry) == entry["expected"]


@pytest.mark.parametrize("path", [p for p in ENTRIES if _load(p)["expected"] != "no-match"], ids=lambda p: p.stem)
def test_plan_names_scales_as_the_target_format(path: Path, registry: cc.Registry):
    """compressed-tensors and fbgemm name every scale ``weight_scale`` (a 128x128 block scale
    included); DeepSeek-style fp8 ``weight_scale_inv``. The plan (issue 7) owns the naming."""
    from conversion_core.plan import build_plan

    entry = _load(path)
    weight = "model.layers.7.mlp.down_proj.weight"
    plan = build_plan({weight: ((256, 256), torch.bfloat16)}, entry["config"], registry=registry)
    scale = plan[weight].scale_name
    assert (None if scale is None else scale.rsplit(".", 1)[1]) == entry["checkpoint_scale_name"]


def test_transformers_quantizer_config_object_round_trips(registry: cc.Registry):
    """A FineGrainedFP8Config object (what a loaded model carries) resolves like its dict."""
    transformers = pytest.importorskip("transformers")
    from transformers import FineGrainedFP8Config

    config = transformers.PretrainedConfig()
    config.quantization_config = FineGrainedFP8Config(weight_block_size=(128, 128))
    assert cc.select_default_conversion(config, registry=registry) == "fp8_128x128"
    config.quantization_config = FineGrainedFP8Config(weight_block_size=(128, 128), scale_fmt="ue8m0")
    with pytest.raises(cc.NoMatchingConversionError):
        cc.select_default_conversion(config, registry=registry)
