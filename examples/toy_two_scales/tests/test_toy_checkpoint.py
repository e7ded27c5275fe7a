"""``convert`` with the toy format: named (``conversion=``), by a config (``like=``), and on the CLI.

DST must hold every planned output under its name, dtype and shape with the bytes of the
conversion, a config.json whose quantization_config is the plugin's (and selects the plugin when
read back), and a manifest listing every output.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import conversion_core as cc

safetensors_torch = pytest.importorskip("safetensors.torch", reason="convert needs safetensors (the [hf] extra)")
pytest.importorskip("tqdm", reason="convert needs tqdm (the [hf] extra)")

from conversion_core.apps.checkpoint import convert_checkpoint, plan_of  # noqa: E402
from conversion_core.apps.cli import main as cli_main  # noqa: E402

NAME = "toy_two_scales"
H, INTER, V = 24, 40, 30
MODULES = [f"model.layers.{n}.{m}" for n in (0, 1) for m in ("self_attn.q_proj", "mlp.up_proj", "mlp.down_proj")]


def source_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}
    for n in (0, 1):
        shapes[f"model.layers.{n}.input_layernorm.weight"] = (H,)
        shapes[f"model.layers.{n}.self_attn.q_proj.weight"] = (H, H)
        shapes[f"model.layers.{n}.mlp.up_proj.weight"] = (INTER, H)
        shapes[f"model.layers.{n}.mlp.down_proj.weight"] = (H, INTER)
    return {n: torch.randn(s, generator=g).bfloat16() for n, s in shapes.items()}


SRC_CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": H}


def write_source(path: Path, state: dict[str, torch.Tensor], sharded: bool) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps(SRC_CONFIG))
    (path / "tokenizer.json").write_text("{}")
    if not sharded:
        safetensors_torch.save_file(state, str(path / "model.safetensors"))
        return path
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in halves.items():
        safetensors_torch.save_file({n: state[n] for n in part}, str(path / file))
    weight_map = {n: file for file, part in halves.items() for n in part}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def read_dst(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(safetensors_torch.load_file(str(file)))
    return tensors


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def check_dst(dst: Path, state: dict[str, torch.Tensor], quantized: list[str], config_ignore: list[str]) -> None:
    conversion = cc.load_registry().get(NAME)
    got = read_dst(dst)
    want: dict[str, torch.Tensor] = {}
    for name, src in state.items():
        module = name.removesuffix(".weight")
        if module in quantized:
            q, m, e = conversion.convert(src)
            want.update(
                {module + ".weight_q": q, module + ".weight_scale": m[:, None], module + ".weight_shift": e[:, None]}
            )
        else:
            want[name] = src
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert (got[name].dtype, tuple(got[name].shape)) == (t.dtype, tuple(t.shape)), name
        assert torch.equal(_bits(got[name]), _bits(t)), name
    config = json.loads((dst / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": NAME, "ignore": sorted(config_ignore)}
    assert {k: v for k, v in config.items() if k != "quantization_config"} == SRC_CONFIG
    assert cc.select_default_conversion(config) == NAME  # the written checkpoint reads back as this format
    assert (dst / "tokenizer.json").is_file()
    manifest = plan_of(dst)
    assert manifest["conversion"] == NAME and manifest["tags"] == conversion.tags
    listed = {o["name"]: (o["dtype"], tuple(o["shape"])) for t in manifest["tensors"] for o in t["outputs"]}
    assert listed == {n: (str(t.dtype).removeprefix("torch."), tuple(t.shape)) for n, t in want.items()}
    for t in manifest["tensors"]:
        assert (t["conversion"] == NAME) == (t["name"].removesuffix(".weight") in quantized), t["name"]


def test_convert_named(tmp_path: Path) -> None:
    state = source_state()
    src = write_source(tmp_path / "src", state, sharded=False)
    result = convert_checkpoint(src, tmp_path / "dst", conversion=NAME, progress=False)
    assert (result.conversion, result.quantized, result.shards) == (NAME, len(MODULES), 1)
    check_dst(tmp_path / "dst", state, MODULES, ["lm_head", "model.embed_tokens"])


def test_convert_like_a_config(tmp_path: Path) -> None:
    """``like=`` a config dict: its ignore list is kept and written back (with the core's keeps)."""
    state = source_state()
    src = write_source(tmp_path / "src", state, sharded=True)
    like = {"model_type": "llama", "quantization_config": {"quant_method": NAME, "ignore": ["model.layers.1.mlp"]}}
    result = convert_checkpoint(src, tmp_path / "dst", like=like, progress=False)
    assert (result.conversion, result.shards) == (NAME, 2)
    quantized = [m for m in MODULES if not m.startswith("model.layers.1.mlp")]
    kept = ["lm_head", "model.embed_tokens", "model.layers.1.mlp.down_proj", "model.layers.1.mlp.up_proj"]
    check_dst(tmp_path / "dst", state, quantized, kept)
    index = json.loads((tmp_path / "dst" / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(read_dst(tmp_path / "dst"))


@pytest.mark.parametrize("how", ["--conversion", "--like"])
def test_cli(tmp_path: Path, how: str, capsys: pytest.CaptureFixture[str]) -> None:
    state = source_state()
    src = write_source(tmp_path / "src", state, sharded=False)
    if how == "--conversion":
        which = [how, NAME]
    else:
        like = tmp_path / "inference_config.json"
        like.write_text(json.dumps({"model_type": "llama", "quantization_config": {"quant_method": NAME}}))
        which = [how, str(like)]
    assert cli_main(["convert", str(src), str(tmp_path / "dst"), *which, "--no-progress"]) == 0
    assert NAME in capsys.readouterr().out
    check_dst(tmp_path / "dst", state, MODULES, ["lm_head", "model.embed_tokens"])


def test_nan_in_a_kept_tensor_writes_nothing(tmp_path: Path) -> None:
    state = source_state()
    state["model.layers.1.input_layernorm.weight"][5] = float("nan")
    src = write_source(tmp_path / "src", state, sharded=False)
    with pytest.raises(cc.ConversionInputError, match=r"model\.layers\.1\.input_layernorm\.weight.*NaN or Inf"):
        convert_checkpoint(src, tmp_path / "dst", conversion=NAME, progress=False)
    assert not (tmp_path / "dst").exists() or not any((tmp_path / "dst").iterdir())
