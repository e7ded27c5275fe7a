"""``conversion-core convert``: tiny checkpoints built from configs, both FP8 formats."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from plan_expectations import (
    DENSE_CONFIG,
    E4M3,
    MOE_CONFIG,
    check_block,
    check_channel,
    model_state,
    needs_builtin_plugins,
    same_bytes,
    tree_digest,
    write_checkpoint,
)
from safetensors import safe_open

import conversion_core as cc
from conversion_core.apps.checkpoint import convert_checkpoint
from conversion_core.apps.cli import main

BLOCK_NAME, CHANNEL_NAME = "fp8_128x128", "cutlass_fp8_e4m3_per_channel"

pytestmark = needs_builtin_plugins


def expect_kept(name: str, shape: tuple[int, ...]) -> bool:
    """What published FP8 checkpoints leave unquantized, restated for the test models' names."""
    return (
        len(shape) == 1
        or name.endswith(".bias")
        or "embed_tokens" in name
        or name.startswith("lm_head")
        or name.endswith("norm.weight")
        or name.endswith("mlp.gate.weight")
    )


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    moe = write_checkpoint(root / "moe", MOE_CONFIG, model_state(MOE_CONFIG, 1), shards=3)
    dense = write_checkpoint(root / "dense", DENSE_CONFIG, model_state(DENSE_CONFIG, 2), shards=1)
    return {"moe": moe, "dense": dense}


@pytest.mark.parametrize("model", ["moe", "dense"])
@pytest.mark.parametrize("conversion", [BLOCK_NAME, CHANNEL_NAME])
def test_convert_writes_what_the_format_expects(checkpoints, tmp_path, model, conversion):
    src = checkpoints[model]
    digest = tree_digest(src)
    dst = tmp_path / "out"
    result = convert_checkpoint(src, dst, conversion=conversion, progress=False)
    assert tree_digest(src) == digest  # SRC never modified
    source = load_dir(src)
    converted = load_dir(dst)
    quantized = [n for n, t in source.items() if not expect_kept(n, tuple(t.shape))]
    assert result.quantized == len(quantized) and result.kept == len(source) - len(quantized)
    if model == "dense":
        assert "lm_head.weight" not in converted  # tied embeddings stay tied
    suffix = "weight_scale_inv" if conversion == BLOCK_NAME else "weight_scale"
    expected_names = set(source) | {n[: -len("weight")] + suffix for n in quantized}
    assert set(converted) == expected_names
    for name, x in source.items():
        if name not in quantized:
            assert same_bytes(converted[name], x), f"{name} changed"
            continue
        q, scale = converted[name], converted[name[: -len("weight")] + suffix]
        n, k = x.shape
        assert q.dtype == E4M3 and scale.dtype == torch.float32
        if conversion == BLOCK_NAME:
            assert tuple(scale.shape) == (math.ceil(n / 128), math.ceil(k / 128))
            check_block(x, q, scale)
        else:
            assert tuple(scale.shape) == (n, 1)  # compressed-tensors channel scales
            check_channel(x, q, scale)

    config = json.loads((dst / "config.json").read_text())
    assert cc.select_default_conversion(dst) == conversion  # config round trip
    assert {k: v for k, v in config.items() if k != "quantization_config"} == json.loads(
        (src / "config.json").read_text()
    )
    qc = config["quantization_config"]
    ignored = qc["ignored_layers"] if conversion == BLOCK_NAME else qc["ignore"]
    assert "model.embed_tokens" in ignored and all("proj" not in m for m in ignored)
    if conversion == BLOCK_NAME:
        assert qc["quant_method"] == "fp8" and qc["weight_block_size"] == [128, 128]
        assert qc["activation_scheme"] == "dynamic" and qc["fmt"] == "e4m3"
    else:
        assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "float-quantized"
        assert qc["config_groups"]["group_0"]["weights"]["strategy"] == "channel"

    for other in ("tokenizer.json", "generation_config.json"):
        assert (dst / other).read_bytes() == (src / other).read_bytes()
    manifest = json.loads((dst / "conversion_manifest.json").read_text())
    assert {row["name"] for row in manifest["tensors"]} == set(source)
    index = dst / "model.safetensors.index.json"
    assert index.exists() == (model == "moe")
    if model == "moe":
        weight_map = json.loads(index.read_text())["weight_map"]
        assert set(weight_map) == set(converted)
        for name, file in weight_map.items():
            with safe_open(str(dst / file), framework="pt") as f:
                assert name in f.keys()
        assert sorted({*weight_map.values()}) == sorted(p.name for p in src.glob("*.safetensors"))


def test_like_config_with_an_ignore_list(checkpoints, tmp_path):
    like = tmp_path / "like.json"
    like.write_text(
        json.dumps(
            {
                "model_type": "qwen3_moe",
                "quantization_config": {
                    "quant_method": "fp8",
                    "activation_scheme": "dynamic",
                    "weight_block_size": [128, 128],
                    "ignored_layers": [f"model.layers.1.self_attn.{p}_proj" for p in "qkv"],
                },
            }
        )
    )
    dst = tmp_path / "out"
    assert main(["convert", str(checkpoints["moe"]), str(dst), "--like", str(like)]) == 0  # with the tqdm bar
    source, converted = load_dir(checkpoints["moe"]), load_dir(dst)
    assert same_bytes(
        converted["model.layers.1.self_attn.q_proj.weight"], source["model.layers.1.self_attn.q_proj.weight"]
    )
    assert "model.layers.1.self_attn.q_proj.weight_scale_inv" not in converted
    assert converted["model.layers.0.self_attn.q_proj.weight"].dtype == E4M3
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert "model.layers.1.self_attn.q_proj" in qc["ignored_layers"]
    assert cc.select_default_conversion(dst) == BLOCK_NAME


def test_like_a_compressed_tensors_block_config_names_scales_weight_scale(checkpoints, tmp_path):
    weights = {"num_bits": 8, "type": "float", "strategy": "block", "block_structure": [128, 128], "symmetric": True}
    acts = {"num_bits": 8, "type": "float", "strategy": "group", "group_size": 128, "dynamic": True}
    like = {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts}},
        "ignore": ["lm_head"],
    }
    dst = tmp_path / "out"
    result = convert_checkpoint(checkpoints["dense"], dst, like=like, progress=False)
    assert result.conversion == BLOCK_NAME
    source, converted = load_dir(checkpoints["dense"]), load_dir(dst)
    x = source["model.layers.0.mlp.down_proj.weight"]
    assert "model.layers.0.mlp.down_proj.weight_scale_inv" not in converted
    check_block(
        x, converted["model.layers.0.mlp.down_proj.weight"], converted["model.layers.0.mlp.down_proj.weight_scale"]
    )
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"] == weights
    assert qc["ignore"][0] == "lm_head" and "model.embed_tokens" in qc["ignore"]
    assert cc.select_default_conversion(dst) == BLOCK_NAME


def test_existing_destination_is_refused_unless_forced(checkpoints, tmp_path, capsys):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep-me.txt").write_text("precious")
    argv = ["convert", str(checkpoints["dense"]), str(dst), "--conversion", BLOCK_NAME, "--no-progress"]
    assert main(argv) == 1
    assert "--force" in capsys.readouterr().err
    assert [p.name for p in dst.iterdir()] == ["keep-me.txt"]
    assert main([*argv, "--force"]) == 0
    assert not (dst / "keep-me.txt").exists() and (dst / "model.safetensors").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["convert", str(checkpoints["dense"]), str(empty), "--conversion", CHANNEL_NAME, "--no-progress"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "out"]  # no temporary directory left


def test_destination_inside_the_source_is_refused(checkpoints, tmp_path):
    with pytest.raises(ValueError, match="must not be SRC"):
        convert_checkpoint(checkpoints["dense"], checkpoints["dense"] / "out", conversion=BLOCK_NAME)
    with pytest.raises(ValueError, match="exactly one"):
        convert_checkpoint(checkpoints["dense"], tmp_path / "x", conversion=BLOCK_NAME, like={"quant_method": "fp8"})


@pytest.mark.parametrize("conversion", [BLOCK_NAME, CHANNEL_NAME])
def test_a_nan_in_the_last_shard_leaves_nothing_behind(tmp_path, conversion):
    state = model_state(MOE_CONFIG, 3)
    names = list(state)  # write_checkpoint puts the last third of the names into the last shard
    victim = [n for n in names[2 * len(names) // 3 :] if not expect_kept(n, tuple(state[n].shape))][-1]
    state[victim][3, 4] = float("nan")
    src = write_checkpoint(tmp_path / "src", MOE_CONFIG, state, shards=3)
    digest = tree_digest(src)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(cc.ConversionCoreError, match=victim.replace(".", r"\.")):
        convert_checkpoint(src, tmp_path / "dst", conversion=conversion, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # neither DST nor a temporary directory
    assert tree_digest(src) == digest


def test_an_already_quantized_source_is_refused(tmp_path):
    config = {**DENSE_CONFIG, "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}
    src = write_checkpoint(tmp_path / "src", config, model_state(DENSE_CONFIG, 4))
    with pytest.raises(ValueError, match="already has a quantization_config"):
        convert_checkpoint(src, tmp_path / "dst", conversion=BLOCK_NAME, progress=False)
    assert not (tmp_path / "dst").exists()


def test_a_conversion_whose_config_cannot_round_trip_is_refused_before_writing(checkpoints, tmp_path):
    with pytest.raises(cc.ConversionCoreError, match="fp32_cast"):
        convert_checkpoint(checkpoints["dense"], tmp_path / "dst", conversion="fp32_cast", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_saved_by_transformers_converts(tmp_path):
    transformers = pytest.importorskip("transformers")
    from conversion_core.apps.demo import MODEL_CONFIG, data_path

    kwargs = json.loads(data_path(MODEL_CONFIG).read_text())
    kwargs.update(num_hidden_layers=1, vocab_size=256)
    config = transformers.AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "src", max_shard_size="400KB")
    result = convert_checkpoint(
        tmp_path / "src", tmp_path / "dst", like=data_path("inference_block.json"), progress=False
    )
    assert result.shards > 1 and result.conversion == BLOCK_NAME
    source, converted = load_dir(tmp_path / "src"), load_dir(tmp_path / "dst")
    for name, x in source.items():
        if expect_kept(name, tuple(x.shape)):
            assert same_bytes(converted[name], x)
        else:
            check_block(x, converted[name], converted[name[: -len("weight")] + "weight_scale_inv"])
    assert cc.select_default_conversion(tmp_path / "dst") == BLOCK_NAME


def test_convert_holds_one_tensor_at_a_time(checkpoints, tmp_path, monkeypatch):
    """The pipeline allocates outputs tensor by tensor (bounded memory, stricter than a shard at a time);
    tensors kept as they are get no buffer at all (their bytes go file to file)."""
    from conversion_core.plan import Plan

    allocated: list[set[str]] = []
    original = Plan.allocate

    def recording(self, device=None):
        allocated.append({e.name for e in self.entries})
        return original(self, device)

    monkeypatch.setattr(Plan, "allocate", recording)
    convert_checkpoint(checkpoints["moe"], tmp_path / "out", conversion=BLOCK_NAME, progress=False)
    index = json.loads((checkpoints["moe"] / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) == 3
    source = load_dir(checkpoints["moe"])
    quantized = sorted(n for n, t in source.items() if not expect_kept(n, tuple(t.shape)))
    assert all(len(names) == 1 for names in allocated)  # one tensor's buffers at a time
    assert sorted(n for names in allocated for n in names) == quantized  # kept tensors: no buffer, no copy
