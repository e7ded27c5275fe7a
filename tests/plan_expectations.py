"""Independent expectations for the plan / convert / demo tests.

The FP8 checks restate DESIGN.md's numerics from scratch (a plain loop over blocks or rows),
and the tiny checkpoints are written tensor by tensor from a config, the way HF checkpoints
name them, without going through conversion-core.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import conversion_core as cc

E4M3 = torch.float8_e4m3fn
BUILTIN = {"bf16_cast", "fp32_cast", "fp8_128x128", "cutlass_fp8_e4m3_per_channel"}
BUILTIN_PLUGINS = "bf16,deepgemm_fp8,cutlass_fp8"

#: These tests drive the built-in plugins as installed distributions (the core-alone session has none).
needs_builtin_plugins = pytest.mark.skipif(
    not BUILTIN <= set(cc.load_registry().names()), reason="needs the three built-in plugins installed"
)


def built_in_registry() -> cc.Registry:
    """The three built-in plugins only, so other installed plugins cannot change the expected picks.

    Leaves ``CONVERSION_CORE_PLUGINS`` and the process-wide registry as the environment says."""
    saved = os.environ.get("CONVERSION_CORE_PLUGINS")
    os.environ["CONVERSION_CORE_PLUGINS"] = BUILTIN_PLUGINS
    try:
        return cc.load_registry(reload=True)
    finally:
        if saved is None:
            del os.environ["CONVERSION_CORE_PLUGINS"]
        else:
            os.environ["CONVERSION_CORE_PLUGINS"] = saved
        cc.load_registry(reload=True)


def expected_block_scales(x: torch.Tensor, block: int = 128) -> torch.Tensor:
    """max(amax, 1e-12) / 448 of every block of a 2-D tensor, by an explicit loop."""
    x = x.float()
    n, k = x.shape
    out = torch.empty(math.ceil(n / block), math.ceil(k / block))
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            amax = x[i * block : (i + 1) * block, j * block : (j + 1) * block].abs().max()
            out[i, j] = torch.clamp(amax, min=1e-12) / 448.0
    return out


def expected_row_scales(x: torch.Tensor) -> torch.Tensor:
    return torch.clamp(x.float().abs().amax(dim=-1), min=1e-12) / 448.0


def expand_blocks(scale: torch.Tensor, n: int, k: int, block: int = 128) -> torch.Tensor:
    rows = torch.arange(n) // block
    cols = torch.arange(k) // block
    return scale[rows][:, cols]


def assert_within_e4m3(x: torch.Tensor, q: torch.Tensor, per_element_scale: torch.Tensor) -> None:
    """|q*s - x| within half an e4m3 step: 2**-4 relative, 2**-10 * s in the subnormal range."""
    assert q.dtype == E4M3
    x = x.float()
    deq = q.float() * per_element_scale
    bound = torch.maximum(x.abs() * 2.0**-4, per_element_scale * 2.0**-10) * (1 + 1e-5) + 1e-30
    err = (deq - x).abs()
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item()}"
    assert bool(torch.isfinite(deq).all())


def check_block(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> None:
    """A 2-D weight quantized with 128x128 blocks."""
    want = expected_block_scales(x)
    assert tuple(scale.shape) == tuple(want.shape)
    torch.testing.assert_close(scale.float(), want, rtol=0, atol=0)
    assert_within_e4m3(x, q, expand_blocks(scale.float(), *x.shape))


def check_channel(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> None:
    """A 2-D weight quantized per output row; scale (N,) or (N, 1)."""
    want = expected_row_scales(x)
    torch.testing.assert_close(scale.float().reshape(-1), want, rtol=0, atol=0)
    assert_within_e4m3(x, q, want[:, None].expand_as(x))


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


# ---- tiny checkpoints written from configs ---------------------------------------------------------

MOE_CONFIG = {
    "model_type": "qwen3_moe",
    "architectures": ["Qwen3MoeForCausalLM"],
    "vocab_size": 300,
    "hidden_size": 256,
    "moe_intermediate_size": 96,  # not a multiple of 128
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "num_experts": 3,
    "num_experts_per_tok": 2,
    "tie_word_embeddings": False,
}

DENSE_CONFIG = {
    "model_type": "qwen2",
    "architectures": ["Qwen2ForCausalLM"],
    "vocab_size": 256,
    "hidden_size": 192,  # not a multiple of 128 either
    "intermediate_size": 320,
    "num_hidden_layers": 2,
    "num_attention_heads": 3,
    "num_key_value_heads": 1,
    "tie_word_embeddings": True,  # no lm_head.weight in the checkpoint
}


def _randn(*shape: int, gen: torch.Generator) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * 0.05).to(torch.bfloat16)


def model_state(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors for ``config``, named as HF checkpoints name them (per-expert 2-D)."""
    gen = torch.Generator().manual_seed(seed)
    h, v = config["hidden_size"], config["vocab_size"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    d = config.get("head_dim", h // heads)
    moe = config["model_type"] == "qwen3_moe"
    sd = {"model.embed_tokens.weight": _randn(v, h, gen=gen)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = _randn(h, gen=gen)
        sd[p + "post_attention_layernorm.weight"] = _randn(h, gen=gen)
        sd[p + "self_attn.q_proj.weight"] = _randn(heads * d, h, gen=gen)
        sd[p + "self_attn.k_proj.weight"] = _randn(kv * d, h, gen=gen)
        sd[p + "self_attn.v_proj.weight"] = _randn(kv * d, h, gen=gen)
        sd[p + "self_attn.o_proj.weight"] = _randn(h, heads * d, gen=gen)
        if moe:
            sd[p + "self_attn.q_norm.weight"] = _randn(d, gen=gen)
            sd[p + "self_attn.k_norm.weight"] = _randn(d, gen=gen)
            inter = config["moe_intermediate_size"]
            sd[p + "mlp.gate.weight"] = _randn(config["num_experts"], h, gen=gen)
            for e in range(config["num_experts"]):
                q = f"{p}mlp.experts.{e}."
                sd[q + "gate_proj.weight"] = _randn(inter, h, gen=gen)
                sd[q + "up_proj.weight"] = _randn(inter, h, gen=gen)
                sd[q + "down_proj.weight"] = _randn(h, inter, gen=gen)
        else:
            for name in ("q_proj", "k_proj", "v_proj"):
                rows = sd[p + f"self_attn.{name}.weight"].shape[0]
                sd[p + f"self_attn.{name}.bias"] = _randn(rows, gen=gen)
            inter = config["intermediate_size"]
            sd[p + "mlp.gate_proj.weight"] = _randn(inter, h, gen=gen)
            sd[p + "mlp.up_proj.weight"] = _randn(inter, h, gen=gen)
            sd[p + "mlp.down_proj.weight"] = _randn(h, inter, gen=gen)
    sd["model.norm.weight"] = _randn(h, gen=gen)
    if not config["tie_word_embeddings"]:
        sd["lm_head.weight"] = _randn(v, h, gen=gen)
    return sd


def write_checkpoint(path: Path, config: dict, state: dict[str, torch.Tensor], shards: int = 1) -> Path:
    """A HF-style checkpoint directory: config.json, tokenizer files, one or ``shards`` safetensors files."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    (path / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    (path / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    names = list(state)
    if shards == 1:
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    weight_map = {}
    per = math.ceil(len(names) / shards)
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        chunk = {n: state[n] for n in names[s * per : (s + 1) * per]}
        save_file(chunk, str(path / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in chunk})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())}}
    index["weight_map"] = weight_map
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return path


def tree_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path`` (to prove it was not modified)."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in path.rglob("*") if p.is_file()
    }
