"""The convert pipeline's file layer and its failure paths, against the safetensors library as the judge."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from plan_expectations import needs_builtin_plugins
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conversion_core.apps import pipeline
from conversion_core.apps.checkpoint import convert_checkpoint
from conversion_core.apps.shard_files import MappedShard, ShardWriter
from conversion_core.errors import ConversionInputError

pytestmark = needs_builtin_plugins


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(67, 256, generator=g).bfloat16(),
        "model.layers.0.mlp.up_proj.weight": torch.randn(200, 300, generator=g).bfloat16(),  # ragged blocks
        "model.layers.0.input_layernorm.weight": torch.randn(256, generator=g).bfloat16(),
        "model.layers.0.mlp.experts.gate_up.weight": torch.randn(3, 130, 256, generator=g).bfloat16(),  # 3D stack
        "model.layers.0.one_row.weight": torch.randn(1, 256, generator=g).bfloat16(),
        "model.norm.weight": torch.randn(256, generator=g).bfloat16(),
    }


def _write(path: Path, state: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def test_mapped_shard_views_equal_the_library_reading(tmp_path):
    state = _state()
    src = _write(tmp_path / "src", state)
    shard = MappedShard(src / "model.safetensors")
    try:
        for name, x in state.items():
            t = shard.tensor(name)
            assert t.dtype == x.dtype and t.shape == x.shape and torch.equal(t.view(torch.int16), x.view(torch.int16))
            shard.release(name)  # pages dropped from the process; the map still reads the file
            assert torch.equal(shard.tensor(name).view(torch.int16), x.view(torch.int16))
    finally:
        shard.close()


def test_an_unaligned_offset_is_read_by_copy(tmp_path):
    """The format allows any header length; a tensor then starts at an odd address."""
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    header = json.dumps({"x": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]}}).encode() + b" "
    assert (8 + len(header)) % 4
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + x.numpy().tobytes())
    shard = MappedShard(path)
    try:
        assert torch.equal(shard.tensor("x"), x)
    finally:
        shard.close()


@pytest.mark.parametrize(
    ("header", "what"),
    [
        (b"not json", "not JSON"),
        (json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode(), "do not hold"),
        (json.dumps({"x": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}).encode(), "Q7"),
        (json.dumps({"x": {"shape": [1]}}).encode(), "malformed"),
    ],
)
def test_a_malformed_header_is_one_line_naming_the_file(tmp_path, header, what):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(ConversionInputError, match=what) as info:
        MappedShard(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_shard_writer_is_read_back_by_the_library(tmp_path):
    state = _state(1)
    src = _write(tmp_path / "src", {"kept": state["model.norm.weight"]})
    shard = MappedShard(src / "model.safetensors")
    layout = [(n, t.dtype, tuple(t.shape)) for n, t in state.items()] + [("kept", torch.bfloat16, (256,))]
    writer = ShardWriter(tmp_path / "out.safetensors", layout)
    for name, t in reversed(state.items()):  # any order
        writer.write(name, t)
    writer.copy("kept", shard, "kept")
    writer.finish()
    shard.close()
    back = load_file(str(tmp_path / "out.safetensors"))
    assert set(back) == set(state) | {"kept"}
    for name, t in state.items():
        assert torch.equal(back[name].view(torch.int16), t.view(torch.int16))
    assert torch.equal(back["kept"].view(torch.int16), state["model.norm.weight"].view(torch.int16))


def test_shard_writer_refuses_a_wrong_tensor_and_a_missing_one(tmp_path):
    writer = ShardWriter(tmp_path / "o.safetensors", [("a", torch.float32, (2,)), ("b", torch.float32, (2,))])
    with pytest.raises(ConversionInputError, match="'a' is torch.float16"):
        writer.write("a", torch.zeros(2, dtype=torch.float16))
    writer.write("a", torch.zeros(2))
    with pytest.raises(ConversionInputError, match="never written.*'b'"):
        writer.finish()
    writer.close()


@pytest.mark.parametrize("where", ["model.norm.weight", "model.layers.0.mlp.up_proj.weight"])
def test_a_nan_in_a_kept_or_quantized_tensor_publishes_nothing(tmp_path, where):
    state = _state(2)
    state[where][-1, ...] = float("nan")
    src = _write(tmp_path / "src", state)
    with pytest.raises(ConversionInputError, match=where.replace(".", r"\.")):
        convert_checkpoint(src, tmp_path / "dst", conversion="fp8_128x128", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_the_kept_tensor_check_finds_every_non_finite_value(dtype, bad):
    """Every size around the vector widths and every position, judged by ``isfinite(x).all()``."""
    g = torch.Generator().manual_seed(7)
    for n in (1, 2, 7, 16, 33, 64, 127, 1000, 4099, 300_007):  # the last one spans threads
        x = torch.randn(n, generator=g).to(dtype)
        pipeline._finite("t", x)  # finite: accepted
        for i in sorted({0, 1, n // 2, n // 2 + 1, n - 2, n - 1} & set(range(n))):
            y = x.clone()
            y[i] = bad
            assert not bool(torch.isfinite(y).all())
            with pytest.raises(ConversionInputError, match="'t'.*NaN or Inf"):
                pipeline._finite("t", y.view(1, n) if n % 2 else y.view(2, n // 2))
    pipeline._finite("t", torch.tensor(1.0, dtype=dtype))  # a 0-d tensor
    pipeline._finite("t", torch.empty(0, 3, dtype=dtype))


def test_kept_tensors_are_the_source_bytes_and_quantized_ones_the_plan_bytes(tmp_path):
    state = _state(3)
    src = _write(tmp_path / "src", state)
    convert_checkpoint(src, tmp_path / "dst", conversion="fp8_128x128", progress=False, device="cpu")
    out = load_file(str(tmp_path / "dst" / "model.safetensors"))
    import conversion_core as cc

    conversion = cc.load_registry().get("fp8_128x128")
    for name, x in state.items():
        if x.dim() == 1 or "embed_tokens" in name:
            assert torch.equal(out[name].view(torch.int16), x.view(torch.int16))
        else:  # the registry's checked conversion, outside the pipeline
            q, scale = conversion.convert(x)
            assert torch.equal(out[name].view(torch.uint8), q.view(torch.uint8))
            assert torch.equal(out[name.removesuffix("weight") + "weight_scale_inv"].reshape(scale.shape), scale)


def test_a_tight_in_flight_budget_still_writes_every_byte(tmp_path, monkeypatch):
    state = _state(4)
    src = _write(tmp_path / "src", state)
    convert_checkpoint(src, tmp_path / "a", conversion="cutlass_fp8_e4m3_per_channel", progress=False)
    monkeypatch.setattr(pipeline, "IN_FLIGHT_BYTES", 1)
    convert_checkpoint(src, tmp_path / "b", conversion="cutlass_fp8_e4m3_per_channel", progress=False)
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[n].view(torch.uint8), b[n].view(torch.uint8)) for n in a)


RSS_CHILD = r"""
import resource, sys
from conversion_core.apps.checkpoint import convert_checkpoint
warm, src, dst = sys.argv[1:]
convert_checkpoint(warm, dst + "-warm", conversion="fp8_128x128", progress=False)  # imports, thread pools
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
convert_checkpoint(src, dst, conversion="fp8_128x128", progress=False)
print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_peak_rss_grows_by_less_than_a_shard_and_its_output(tmp_path):
    """Three 32 MB shards of four tensors: the process grows by less than one shard plus its output
    (what holding a whole shard and its outputs costs), since it holds about one tensor at a time."""
    src = tmp_path / "src"
    src.mkdir()
    weight_map = {}
    g = torch.Generator().manual_seed(5)
    for i in range(3):
        file = f"model-{i:05d}-of-00003.safetensors"
        shard = {f"model.layers.{i}.mlp.p{j}.weight": torch.randn(2048, 2048, generator=g).bfloat16() for j in range(4)}
        save_file(shard, str(src / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in shard})
        del shard
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    warm = _write(tmp_path / "warm", _state(6))
    proc = subprocess.run(
        [sys.executable, "-c", RSS_CHILD, str(warm), str(src), str(tmp_path / "dst")],
        capture_output=True,
        text=True,
        check=True,
    )
    base_kb, peak_kb = map(int, proc.stdout.split())
    shard_mb = 4 * 2048 * 2048 * 2 / 2**20
    out_mb = shard_mb / 2 + 4 * 16 * 16 * 4 / 2**20  # e4m3 bytes and float32 block scales
    assert (peak_kb - base_kb) / 1024 < shard_mb + out_mb, (base_kb, peak_kb)
    with safe_open(str(tmp_path / "dst" / "model-00001-of-00003.safetensors"), framework="pt") as f:
        assert f.get_tensor("model.layers.1.mlp.p0.weight").dtype == torch.float8_e4m3fn
