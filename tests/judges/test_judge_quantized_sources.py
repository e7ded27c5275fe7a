"""Class 2 against the reference producer: what llm-compressor writes is never read as bf16.

Each scheme's real output (``model_free_ptq`` on a tiny bf16 checkpoint) is refused by ``convert``,
with its config as written, and again with the ``quantization_config`` deleted from config.json
(the tensors alone must give it away), naming a tensor llm-compressor wrote.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import conversion_core as cc
from conversion_core.apps.checkpoint import convert_checkpoint

SCHEMES = ["FP8_BLOCK", "FP8_DYNAMIC", "MXFP8", "MXFP4", "W4A16", "W4A16_ASYM"]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("bf16")
    g = torch.Generator().manual_seed(0)
    state = {
        "model.embed_tokens.weight": torch.randn(64, 128, generator=g).to(torch.bfloat16),
        "model.layers.0.input_layernorm.weight": torch.ones(128, dtype=torch.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(128, 128, generator=g).to(torch.bfloat16),
        "model.layers.0.mlp.up_proj.weight": torch.randn(256, 128, generator=g).to(torch.bfloat16),
        "lm_head.weight": torch.randn(64, 128, generator=g).to(torch.bfloat16),
    }
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    (src / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    return src


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("strip_config", [False, True], ids=["as-written", "config-stripped"])
def test_llm_compressor_output_is_refused_as_a_source(source, tmp_path, scheme, strip_config):
    from llmcompressor import model_free_ptq

    quantized = tmp_path / "q"
    model_free_ptq(str(source), str(quantized), scheme=scheme, ignore=["lm_head"], max_workers=1, device="cpu")
    with safe_open(str(quantized / "model.safetensors"), framework="pt") as f:
        written = set(f.keys())
    if strip_config:
        config = json.loads((quantized / "config.json").read_text())
        assert config.pop("quantization_config")
        (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(cc.ConversionInputError, match="already quantized") as info:
        convert_checkpoint(quantized, tmp_path / "dst", conversion="bf16_cast", progress=False)
    message = str(info.value)
    assert "\n" not in message
    if strip_config:
        assert any(repr(name) in message for name in written - {"lm_head.weight"})
    else:
        assert "quantization_config" in message
    assert not (tmp_path / "dst").exists()
