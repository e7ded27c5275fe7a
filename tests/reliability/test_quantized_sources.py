"""Class 2: an already-quantized source never passes as bf16 weights.

Each case is a tiny checkpoint laid out the way a quantizer writes it (names and dtypes from the
published layouts: GPTQ/AWQ packed int32 words, compressed-tensors packed weights and scales,
DeepSeek-style e4m3 weights with ``weight_scale_inv``, ModelOpt's ``weight_scale_2``, bitsandbytes
state stored under the weight, int8 rows with ``SCB``), or an unquantized checkpoint carrying a
quantizer's config. ``convert`` must refuse it in one line naming the file and the tensor or key,
before DST exists; ``build_plan`` must refuse the same tensors in a state dict. Look-alikes that
real unquantized models hold (weight norm's ``weight_g``/``weight_v``, parametrizations, CLIP's
``logit_scale``) must still convert.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import conversion_core as cc
from conversion_core.apps.checkpoint import convert_checkpoint
from conversion_core.apps.cli import main
from conversion_core.plan import build_plan

CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
LAYER = "model.layers.0.self_attn.q_proj"
BF16 = torch.bfloat16


def plain_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(32, 64, generator=g).to(BF16),
        "model.layers.0.input_layernorm.weight": torch.ones(64, dtype=BF16),
        "model.layers.0.mlp.up_proj.weight": torch.randn(64, 64, generator=g).to(BF16),
    }


def t(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return (
        torch.zeros(shape, dtype=torch.float32).to(dtype)
        if dtype.is_floating_point
        else torch.zeros(shape, dtype=dtype)
    )


#: (case, extra tensors as a quantizer stores them, the tensor the error must name)
QUANTIZED = [
    (
        "gptq",
        {
            f"{LAYER}.qweight": t((8, 64), torch.int32),
            f"{LAYER}.qzeros": t((1, 8), torch.int32),
            f"{LAYER}.scales": t((1, 64), torch.float16),
            f"{LAYER}.g_idx": t((64,), torch.int32),
        },
        "name quantizers store",
    ),
    ("awq-scales-only", {f"{LAYER}.scales": t((1, 64), torch.float16)}, "scales"),
    (
        "ct-packed",
        {
            f"{LAYER}.weight_packed": t((64, 8), torch.int32),
            f"{LAYER}.weight_shape": t((2,), torch.int64),
            f"{LAYER}.weight_scale": t((64, 2), BF16),
        },
        "weight_packed",
    ),
    ("ct-zero-point", {f"{LAYER}.weight_zero_point": t((64, 2), torch.int8)}, "weight_zero_point"),
    (
        "block-fp8",
        {f"{LAYER}.weight": t((64, 64), torch.float8_e4m3fn), f"{LAYER}.weight_scale_inv": t((1, 1), torch.float32)},
        "weight",
    ),
    ("scale-inv-alone", {f"{LAYER}.weight_scale_inv": t((1, 1), torch.float32)}, "weight_scale_inv"),
    ("nvfp4-global", {f"{LAYER}.weight_global_scale": t((1,), torch.float32)}, "weight_global_scale"),
    ("modelopt-scale-2", {f"{LAYER}.weight_scale_2": t((), torch.float32)}, "weight_scale_2"),
    ("static-input-scale", {f"{LAYER}.input_scale": t((1,), torch.float32)}, "input_scale"),
    ("kv-cache-scale", {"model.layers.0.self_attn.k_scale": t((), torch.float32)}, "k_scale"),
    ("bnb-4bit-state", {f"{LAYER}.weight.absmax": t((4,), torch.float32)}, "absmax"),
    ("bnb-4bit-quant-state", {f"{LAYER}.weight.quant_state.bitsandbytes__nf4": t((8,), torch.uint8)}, "quant_state"),
    ("bnb-int8-scb", {f"{LAYER}.SCB": t((64,), torch.float32)}, "SCB"),
    ("int8-weight", {f"{LAYER}.weight": t((64, 64), torch.int8)}, "int8"),
    ("uint8-packed-weight", {f"{LAYER}.weight": t((64, 32), torch.uint8)}, "uint8"),
    ("int32-weight", {f"{LAYER}.weight": t((64, 8), torch.int32)}, "int32"),
    ("e5m2-weight", {f"{LAYER}.weight": t((64, 64), torch.float8_e5m2)}, "float8_e5m2"),
    ("int8-embedding", {"model.embed_tokens.weight": t((32, 64), torch.int8)}, "embed_tokens"),
]

#: Unquantized models' own tensors that look like markers and are not.
LOOK_ALIKES = {
    "wav2vec2.encoder.pos_conv_embed.conv.weight_g": t((1, 1, 8), BF16),
    "wav2vec2.encoder.pos_conv_embed.conv.weight_v": t((64, 4, 8), BF16),
    "model.layers.0.mlp.down_proj.parametrizations.weight.original0": t((64, 64), BF16),
    "logit_scale": t((), torch.float32),
    "model.layers.0.layer_scale": t((64,), BF16),
    "model.rotary_emb.inv_freq": t((16,), torch.float32),
    "model.position_ids": t((1, 32), torch.int64),
}


def write(path: Path, state: dict[str, torch.Tensor], config: dict | None = None, files: dict | None = None) -> Path:
    path.mkdir(parents=True)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config or CONFIG))
    for name, text in (files or {}).items():
        (path / name).write_text(text)
    return path


@pytest.mark.parametrize(("case", "extra", "named"), QUANTIZED, ids=[c[0] for c in QUANTIZED])
def test_convert_refuses_quantized_tensors_naming_file_and_tensor(tmp_path, case, extra, named):
    src = write(tmp_path / "src", {**plain_state(), **extra})
    with pytest.raises(cc.ConversionInputError) as info:
        convert_checkpoint(src, tmp_path / "dst", conversion="bf16_cast", progress=False)
    message = str(info.value)
    assert "\n" not in message and "already quantized" in message
    assert str(src / "model.safetensors") in message and named in message
    assert any(repr(k) in message for k in extra)  # the full name of one of the quantizer's tensors
    assert not (tmp_path / "dst").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no temporary directory either


@pytest.mark.parametrize(("case", "extra", "named"), QUANTIZED, ids=[c[0] for c in QUANTIZED])
def test_build_plan_refuses_the_same_state_dict(case, extra, named):
    state = {**plain_state(), **extra}
    with pytest.raises(cc.ConversionInputError, match="already quantized") as info:
        build_plan(state, conversion="bf16_cast")
    assert named in str(info.value) and any(repr(k) in str(info.value) for k in extra)
    meta = {n: torch.empty(v.shape, dtype=v.dtype, device="meta") for n, v in state.items()}
    with pytest.raises(cc.ConversionInputError, match="already quantized"):  # headers alone suffice
        build_plan(meta, {"quant_method": "fp8", "weight_block_size": [128, 128]})


@pytest.mark.parametrize(
    ("config", "files", "marker"),
    [
        ({**CONFIG, "quantization_config": {"quant_method": "gptq", "bits": 4}}, {}, "quantization_config"),
        (
            {**CONFIG, "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}},
            {},
            "quantization_config",
        ),
        ({**CONFIG, "compression_config": {"format": "pack-quantized"}}, {}, "compression_config"),
        (CONFIG, {"quantize_config.json": '{"bits": 4, "group_size": 128}'}, "quantize_config.json"),
        (CONFIG, {"quant_config.json": '{"w_bit": 4, "q_group_size": 128}'}, "quant_config.json"),
        (CONFIG, {"hf_quant_config.json": '{"producer": {"name": "modelopt"}}'}, "hf_quant_config.json"),
    ],
    ids=["qc-gptq", "qc-fp8", "compression-config", "gptq-file", "awq-file", "modelopt-file"],
)
def test_convert_refuses_a_quantizers_config_in_one_line(tmp_path, config, files, marker):
    """The weights themselves look plain: only the config says they are not."""
    src = write(tmp_path / "src", plain_state(), config, files)
    with pytest.raises(cc.ConversionInputError) as info:
        convert_checkpoint(src, tmp_path / "dst", conversion="bf16_cast", progress=False)
    assert marker in str(info.value) and "already quantized" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "dst").exists()


def test_cli_exit_1_with_one_line(tmp_path, capsys):
    src = write(tmp_path / "src", {**plain_state(), **QUANTIZED[0][1]})
    assert main(["convert", str(src), str(tmp_path / "dst"), "--conversion", "bf16_cast", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already quantized" in err[0] and LAYER in err[0]


def test_look_alikes_of_unquantized_models_still_convert(tmp_path):
    state = {**plain_state(), **LOOK_ALIKES}
    plan = build_plan(state, conversion="bf16_cast")
    assert all(plan[name].name == name for name in LOOK_ALIKES)
    convert_checkpoint(write(tmp_path / "src", state), tmp_path / "dst", conversion="bf16_cast", progress=False)
    assert (tmp_path / "dst" / "model.safetensors").is_file()
