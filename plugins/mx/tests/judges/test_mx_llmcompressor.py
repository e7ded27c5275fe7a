"""Judges: llm-compressor's ``model_free_ptq`` (schemes MXFP8, MXFP4, CPU) and transformers on CPU.

On the same tiny bf16 checkpoints (built here from transformers configs with random weights,
nothing downloaded) ``conversion-core convert --like <llm-compressor's config>`` must write every
tensor llm-compressor writes with the same name, dtype, shape and bytes, and a
``quantization_config`` with the same meaning; transformers must load our checkpoint and give the
logits of the same model whose weights went through an independent reference round trip
(compressed-tensors' own decompression of llm-compressor's checkpoint).

Checkpoints: a llama-style model (an outlier weight, MLP rows 160 — not a multiple of 128), and
a Qwen3-MoE-style one in the hub's per-expert layout (``experts.<i>.gate_proj.weight``).
``embed_tokens`` and the MoE router ``mlp.gate`` are in the ignore list: model_free_ptq matches
modules by name and would quantize them, which transformers (nn.Linear only, no router) cannot load.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

llmcompressor = pytest.importorskip("llmcompressor")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

import conversion_core as cc  # noqa: E402
from conversion_core.apps.checkpoint import convert_checkpoint  # noqa: E402

IGNORE = ["lm_head", "re:.*embed_tokens$", "re:.*mlp.gate$"]
SCHEMES = {"MXFP8": "mxfp8", "MXFP4": "mxfp4"}


def _llama(path: Path) -> Path:
    cfg = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[3, 17] = 40.0  # an outlier: its group's scale jumps
        model.model.layers[1].self_attn.q_proj.weight[5, :32] = 0.0  # an all-zero group
    model.save_pretrained(path)
    return path


def _qwen3_moe(path: Path) -> Path:
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=96,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(1)
    model = transformers.Qwen3MoeForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path)
    _per_expert(path, cfg.num_experts)
    return path


def _per_expert(path: Path, experts: int) -> None:
    """Rewrite fused expert parameters (transformers 5) in the hub's per-expert layout, if needed."""
    from safetensors.torch import save_file

    files = sorted(path.glob("*.safetensors"))
    assert len(files) == 1
    tensors = load_file(files[0])
    out = {}
    for name, t in tensors.items():
        if name.endswith("mlp.experts.gate_up_proj"):  # (E, 2I, H)
            prefix = name[: -len("gate_up_proj")]
            for e in range(experts):
                gate, up = t[e].chunk(2, dim=0)
                out[f"{prefix}{e}.gate_proj.weight"] = gate.contiguous()
                out[f"{prefix}{e}.up_proj.weight"] = up.contiguous()
        elif name.endswith("mlp.experts.down_proj"):  # (E, H, I)
            prefix = name[: -len("down_proj")]
            for e in range(experts):
                out[f"{prefix}{e}.down_proj.weight"] = t[e].contiguous()
        else:
            out[name] = t
    save_file(out, files[0], metadata={"format": "pt"})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mx_judges")
    return {"llama": _llama(root / "llama"), "qwen3_moe": _qwen3_moe(root / "qwen3_moe")}


@pytest.fixture(scope="module")
def converted(checkpoints, tmp_path_factory) -> dict[tuple[str, str], tuple[Path, Path]]:
    """(model, scheme) -> (llm-compressor's checkpoint, ours converted --like its config)."""
    from llmcompressor import model_free_ptq

    root = tmp_path_factory.mktemp("mx_out")
    out = {}
    for model, src in checkpoints.items():
        for scheme in SCHEMES:
            ref = root / f"{model}-{scheme}-llmc"
            model_free_ptq(str(src), str(ref), scheme=scheme, ignore=IGNORE, max_workers=1, device="cpu")
            ours = root / f"{model}-{scheme}-ours"
            convert_checkpoint(src, ours, like=ref / "config.json", progress=False)
            out[(model, scheme)] = (ref, ours)
    return out


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


CASES = [(m, s) for m in ("llama", "qwen3_moe") for s in SCHEMES]


@pytest.mark.parametrize(("model", "scheme"), CASES)
def test_every_tensor_identical_to_llm_compressor(converted, model, scheme):
    ref_dir, our_dir = converted[(model, scheme)]
    ref, ours = _tensors(ref_dir), _tensors(our_dir)
    assert sorted(ours) == sorted(ref)
    for name, want in ref.items():
        got = ours[name]
        assert (got.dtype, tuple(got.shape)) == (want.dtype, tuple(want.shape)), name
        assert torch.equal(
            got.view(torch.uint8) if got.dtype.itemsize == 1 else got,
            want.view(torch.uint8) if want.dtype.itemsize == 1 else want,
        ), name
    quantized = [n for n in ref if n.endswith("weight_scale")]
    assert len(quantized) >= 7 * (2 if model == "llama" else 1)


def _semantics(qc: dict) -> dict:
    (group,) = qc["config_groups"].values()
    return {
        "quant_method": qc["quant_method"],
        "format": qc["format"],
        "status": qc["quantization_status"],
        "ignore": sorted(qc["ignore"]),
        "targets": group["targets"],
        "weights": {k: v for k, v in group["weights"].items() if k not in ("observer", "observer_kwargs")},
        "input_activations": group["input_activations"] and group["input_activations"]["dynamic"],
        "kv_cache_scheme": qc.get("kv_cache_scheme"),
    }


@pytest.mark.parametrize(("model", "scheme"), CASES)
def test_quantization_config_has_the_same_meaning(converted, model, scheme):
    ref_dir, our_dir = converted[(model, scheme)]
    ref_qc = json.loads((ref_dir / "config.json").read_text())["quantization_config"]
    our_qc = json.loads((our_dir / "config.json").read_text())["quantization_config"]
    assert _semantics(our_qc) == _semantics(ref_qc)
    assert cc.select_default_conversion(our_dir) == SCHEMES[scheme]


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_direct_conversion_config_matches_llm_compressor(checkpoints, converted, tmp_path, scheme):
    """``convert --conversion mxfp8`` (no --like) writes llm-compressor's config for the same ignore set."""
    ref_dir, _ = converted[("llama", scheme)]
    ours = tmp_path / "direct"
    convert_checkpoint(checkpoints["llama"], ours, conversion=SCHEMES[scheme], progress=False)
    ref_qc = json.loads((ref_dir / "config.json").read_text())["quantization_config"]
    our_qc = json.loads((ours / "config.json").read_text())["quantization_config"]
    ref_sem, our_sem = _semantics(ref_qc), _semantics(our_qc)
    ref_sem.pop("ignore"), our_sem.pop("ignore")
    assert our_sem == ref_sem
    assert "lm_head" in our_qc["ignore"]
    ref, got = _tensors(ref_dir), _tensors(ours)
    for name in ref:
        if name.endswith("weight_scale"):
            assert torch.equal(got[name], ref[name]), name


def _logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from compressed_tensors.quantization import disable_quantization
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=CompressedTensorsConfig(dequantize=True), dtype=torch.bfloat16
    )
    # The MX schemes also fake-quantize activations (dynamic, per 32) in forward; the judge here is
    # the weights, so that is switched off: the reference model below runs plain bf16 activations.
    model.apply(disable_quantization)
    model.eval()
    with torch.no_grad():
        return model(ids).logits.float()


#: transformers' bug, not our checkpoint's: llm-compressor's own MXFP8 checkpoint of the same model
#: fails the same way (checked with transformers 5.17.0, compressed-tensors 0.19.0, llm-compressor
#: 0.14.0.1; the branch is unchanged in 5.25), and MXFP4 experts load. Strict: a fix upstream
#: turns this into an XPASS that fails the run, so the mark is then removed.
MXFP8_EXPERTS_BUG = pytest.mark.xfail(
    strict=True,
    raises=RuntimeError,
    reason="transformers (integrations/compressed_tensors.py, DecompressExperts.convert) takes every 8-bit "
    "float expert scheme for per-tensor/per-channel FP8 and folds the scale as quant.float() * scale.float() "
    "without expanding MXFP8's group-of-32 E8M0 scales (nor reading them as exponents): 'The size of tensor a "
    "(64) must match the size of tensor b (2) at non-singleton dimension 1' while merging "
    "experts.gate_up_proj, then from_pretrained raises RuntimeError 'We encountered some issues during "
    "automatic conversion of the weights' (utils/loading_report.py, log_state_dict_report)",
)
LOAD_CASES = [
    pytest.param(m, s, marks=MXFP8_EXPERTS_BUG) if (m, s) == ("qwen3_moe", "MXFP8") else (m, s) for m, s in CASES
]


@MXFP8_EXPERTS_BUG
def test_transformers_loads_llm_compressors_own_mxfp8_moe_checkpoint(converted):
    """The reference's own checkpoint fails as ours does: the bug is transformers', not our bytes'."""
    ref_dir, _ = converted[("qwen3_moe", "MXFP8")]
    assert torch.isfinite(_logits(ref_dir, torch.arange(12).reshape(2, 6) % 96)).all()


@pytest.mark.parametrize(("model", "scheme"), LOAD_CASES)
def test_transformers_loads_ours_and_gives_the_reference_logits(checkpoints, converted, tmp_path, model, scheme):
    ref_dir, our_dir = converted[(model, scheme)]
    ids = torch.arange(12).reshape(2, 6) % 96
    ours = _logits(our_dir, ids)
    # The reference round trip: the bf16 model with each quantized weight replaced by our independent
    # dequantization of llm-compressor's bytes (e2m1/e4m3 value times 2**(byte - 127)).
    from transformers import AutoModelForCausalLM

    ref_model = AutoModelForCausalLM.from_pretrained(checkpoints[model], dtype=torch.bfloat16)
    ref = _tensors(ref_dir)
    conversion = cc.load_registry().get(SCHEMES[scheme])
    values = "weight" if scheme == "MXFP8" else "weight_packed"
    state = ref_model.state_dict()
    replaced = 0
    for name in ref:
        if not name.endswith(".weight_scale"):
            continue
        module = name[: -len(".weight_scale")]
        w = conversion.dequantize(ref[f"{module}.{values}"], ref[name]).to(torch.bfloat16)
        key = f"{module}.weight"
        if key not in state:  # transformers 5 fuses the hub's per-expert weights
            replaced += _set_fused_expert(state, module, w)
            continue
        state[key].copy_(w)
        replaced += 1
    assert replaced == len([n for n in ref if n.endswith(".weight_scale")])
    ref_model.eval()
    with torch.no_grad():
        want = ref_model(ids).logits.float()
    assert torch.isfinite(ours).all()
    assert torch.equal(ours, want)


def _set_fused_expert(state: dict, module: str, w: torch.Tensor) -> int:
    """``...mlp.experts.<e>.<proj>`` into transformers' fused ``experts.gate_up_proj`` / ``down_proj``."""
    prefix, e, proj = module.rsplit(".", 2)
    e = int(e)
    if proj == "down_proj":
        state[f"{prefix}.down_proj"][e].copy_(w)
    else:
        fused = state[f"{prefix}.gate_up_proj"][e]
        half = fused.shape[0] // 2
        (fused[:half] if proj == "gate_proj" else fused[half:]).copy_(w)
    return 1
