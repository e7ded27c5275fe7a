"""Judges: ``convert --conversion nvfp4`` against llm-compressor 0.14 ``model_free_ptq(scheme="NVFP4A16")``
on the same bf16 checkpoints (CPU): every tensor's name, dtype, shape and bytes, and the
quantization_config semantics; then transformers loads ours and its logits equal those of the same
model with the weights round-tripped by a reference written here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("llmcompressor")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

import conversion_core as cc  # noqa: E402
from conversion_core.apps.checkpoint import convert_checkpoint  # noqa: E402


def _llama(root: Path) -> None:
    cfg = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=80,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=5,
        num_key_value_heads=1,
        head_dim=16,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight[3, 7] = 9.0  # an outlier: q/k/v share its global scale
        model.model.layers[1].mlp.up_proj.weight[0, :16] = 0.0  # a zero group
    model.save_pretrained(root, safe_serialization=True)


def _qwen3_moe(root: Path) -> None:
    """A tiny Qwen3-MoE checkpoint in the hub's per-expert layout (experts.N.gate_proj ...)."""
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=64,
        hidden_size=48,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        tie_word_embeddings=False,
    )
    g = torch.Generator().manual_seed(1)
    t: dict[str, torch.Tensor] = {}

    def w(name: str, *shape: int) -> None:
        t[name] = (torch.randn(shape, generator=g) * 0.05).bfloat16()

    w("model.embed_tokens.weight", 64, 48)
    w("lm_head.weight", 64, 48)
    t["model.norm.weight"] = torch.ones(48, dtype=torch.bfloat16)
    p = "model.layers.0"
    for n, shape in (("q_proj", (48, 48)), ("k_proj", (16, 48)), ("v_proj", (16, 48)), ("o_proj", (48, 48))):
        w(f"{p}.self_attn.{n}.weight", *shape)
    t[f"{p}.self_attn.q_norm.weight"] = torch.ones(16, dtype=torch.bfloat16)
    t[f"{p}.self_attn.k_norm.weight"] = torch.ones(16, dtype=torch.bfloat16)
    t[f"{p}.input_layernorm.weight"] = torch.ones(48, dtype=torch.bfloat16)
    t[f"{p}.post_attention_layernorm.weight"] = torch.ones(48, dtype=torch.bfloat16)
    w(f"{p}.mlp.gate.weight", 4, 48)
    for e in range(4):
        w(f"{p}.mlp.experts.{e}.gate_proj.weight", 32, 48)
        w(f"{p}.mlp.experts.{e}.up_proj.weight", 32, 48)
        w(f"{p}.mlp.experts.{e}.down_proj.weight", 48, 32)
    root.mkdir(parents=True)
    save_file(t, str(root / "model.safetensors"), metadata={"format": "pt"})
    (root / "config.json").write_text(json.dumps(cfg.to_dict()))


def _tensors(root: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(root.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


# llm-compressor quantizes every 2-D weight its targets match, embeddings too; the published
# checkpoints (and our plan) keep embeddings, lm_head and router gates.
IGNORE = ["lm_head", "re:.*embed_tokens$", "re:.*mlp.gate$"]


@pytest.fixture(scope="module", params=["llama", "qwen3_moe"])
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    from llmcompressor import model_free_ptq

    root = tmp_path_factory.mktemp(request.param)
    (_llama if request.param == "llama" else _qwen3_moe)(root / "src")
    model_free_ptq(str(root / "src"), str(root / "lc"), scheme="NVFP4A16", ignore=IGNORE, max_workers=1, device="cpu")
    convert_checkpoint(root / "src", root / "ours", conversion="nvfp4", progress=False)
    return root / "src", root / "lc", root / "ours"


def test_every_tensor_identical(pair: tuple[Path, Path, Path]) -> None:
    _, lc, ours = pair
    want, got = _tensors(lc), _tensors(ours)
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        g = got[name]
        assert (g.dtype, tuple(g.shape)) == (w.dtype, tuple(w.shape)), name
        assert torch.equal(g.contiguous().view(torch.uint8), w.contiguous().view(torch.uint8)), name


def _quantized_modules(root: Path) -> set[str]:
    return {n.removesuffix(".weight_packed") for n in _tensors(root) if n.endswith(".weight_packed")}


def test_quantization_config_semantics(pair: tuple[Path, Path, Path]) -> None:
    _, lc, ours = pair
    want = json.loads((lc / "config.json").read_text())["quantization_config"]
    got = json.loads((ours / "config.json").read_text())["quantization_config"]
    for key in ("quant_method", "format", "quantization_status", "kv_cache_scheme"):
        assert got[key] == want[key], key
    (wg,), (gg,) = want["config_groups"].values(), got["config_groups"].values()
    assert gg["weights"] == wg["weights"] and gg["targets"] == wg["targets"] and gg["format"] == wg["format"]
    assert gg["input_activations"] == wg["input_activations"] is None
    assert _quantized_modules(ours) == _quantized_modules(lc)
    assert cc.select_default_conversion(got) == cc.select_default_conversion(want) == "nvfp4"


E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def _reference_dequant(packed: torch.Tensor, scale: torch.Tensor, gs: torch.Tensor) -> torch.Tensor:
    codes = torch.stack((packed & 15, packed >> 4), -1).flatten(-2).long()
    vals = E2M1[codes & 7] * (1 - 2 * ((codes >> 3) & 1)).float()
    step = (scale.float() / gs.float()).repeat_interleave(16, dim=-1)
    return vals * step


def test_transformers_loads_and_logits_match(pair: tuple[Path, Path, Path]) -> None:
    src, _, ours = pair
    if "llama" not in str(src):
        pytest.skip("logits checked on the dense model")
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(ours, dtype=torch.bfloat16)
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    t = _tensors(ours)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            module = name.removesuffix(".weight")
            if f"{module}.weight_packed" in t:
                w = _reference_dequant(
                    t[f"{module}.weight_packed"], t[f"{module}.weight_scale"], t[f"{module}.weight_global_scale"]
                )
                p.copy_(w.to(p.dtype))
    ids = torch.arange(12).reshape(1, 12) % 96
    with torch.no_grad():
        got, want = loaded(ids).logits, ref(ids).logits
    assert torch.equal(got, want)
