"""Class 5: every bad input is one line naming the tensor, file or option, before any work.

OS errors (no space, read-only parent, long names) are in test_publish.py; here: a bad
``--device``, safetensors dtypes the core does not read, zero-size weights, a plugin's raising
shape function, and ``requires_grad`` sources (outputs must not join the autograd graph).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import conversion_core as cc
from conversion_core.apps.checkpoint import convert_checkpoint
from conversion_core.apps.cli import main
from conversion_core.plan import build_plan

NAME = "model.layers.0.mlp.up_proj.weight"
QUANTIZING = ["fp8_128x128", "cutlass_fp8_e4m3_per_channel"]


def checkpoint(path: Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    path.mkdir(parents=True)
    save_file(state or {NAME: torch.randn(128, 128).to(torch.bfloat16)}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return path


def raw_shard(path: Path, dtype: str, nbytes: int) -> Path:
    """A safetensors file written byte by byte, so any header dtype code can be tried."""
    path.mkdir(parents=True)
    header = json.dumps({NAME: {"dtype": dtype, "shape": [4, 4], "data_offsets": [0, nbytes]}}).encode()
    header += b" " * (-len(header) % 8)
    (path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * nbytes)
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return path


def one_line_cli(capsys, *args: str) -> str:
    assert main(list(args)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize(
    ("device", "words"),
    [
        ("nonsense", "is not a device"),
        ("meta", "hold no data"),
        ("cpu:1", "one cpu device"),
        pytest.param("cuda:99", "not usable here", id="cuda-missing-index"),
    ],
)
def test_a_bad_device_is_one_line_before_any_work(tmp_path, capsys, device, words):
    src = checkpoint(tmp_path / "src")
    line = one_line_cli(capsys, "convert", str(src), str(tmp_path / "dst"), "--conversion", "fp8_128x128",
                        "--device", device, "--no-progress")  # fmt: skip
    assert f"--device {device!r}" in line and words in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_line(tmp_path, capsys):
    src = checkpoint(tmp_path / "src")
    line = one_line_cli(capsys, "convert", str(src), str(tmp_path / "dst"), "--conversion", "bf16_cast",
                        "--device", "cuda", "--no-progress")  # fmt: skip
    assert "--device 'cuda' is not usable here" in line


@pytest.mark.parametrize(("code", "nbytes"), [("F8_E8M0", 16), ("F4", 8), ("C64", 128)])
def test_a_safetensors_dtype_the_core_does_not_read_names_file_and_tensor(tmp_path, capsys, code, nbytes):
    src = raw_shard(tmp_path / "src", code, nbytes)
    line = one_line_cli(
        capsys, "convert", str(src), str(tmp_path / "dst"), "--conversion", "bf16_cast", "--no-progress"
    )
    assert str(src / "model.safetensors") in line and repr(NAME) in line and repr(code) in line


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64], ids=str)
def test_unsigned_tensors_are_read_and_carried_bit_exact(tmp_path, dtype):
    """safetensors writes U16/U32/U64; a source holding one (an index table, say) converts, nothing lost."""
    bits = torch.iinfo(dtype).bits
    values = (torch.arange(16, dtype=torch.int64) << (bits - 8)).to(dtype)  # high bits set
    src = checkpoint(tmp_path / "src", {NAME: torch.randn(128, 128, dtype=torch.bfloat16), "extra.table": values})
    convert_checkpoint(src, tmp_path / "dst", conversion="fp8_128x128", progress=False)
    out = load_file(str(tmp_path / "dst" / "model.safetensors"))
    assert out["extra.table"].dtype == dtype and torch.equal(out["extra.table"], values)


def test_a_header_safetensors_cannot_parse_names_the_file(tmp_path, capsys):
    src = raw_shard(tmp_path / "src", "XYZ", 16)
    line = one_line_cli(
        capsys, "convert", str(src), str(tmp_path / "dst"), "--conversion", "bf16_cast", "--no-progress"
    )
    assert str(src / "model.safetensors") in line


@pytest.mark.parametrize("conversion", QUANTIZING)
@pytest.mark.parametrize("shape", [(0, 128), (128, 0), (0, 4, 4), (2, 0, 128)], ids=str)
def test_zero_size_weights_are_one_line_everywhere(tmp_path, conversion, shape):
    c = cc.load_registry().get(conversion)
    empty = torch.zeros(shape)
    for call in (lambda: c.convert(empty), lambda: c.allocate(shape)):
        with pytest.raises(cc.ConversionInputError, match=r"has no elements"):
            call()
    with pytest.raises(cc.ConversionInputError, match=rf"'{NAME}'.*has no elements"):
        build_plan({NAME: empty}, conversion=conversion)
    src = checkpoint(tmp_path / "src", {NAME: empty.to(torch.bfloat16)})
    with pytest.raises(cc.ConversionInputError, match=rf"'{NAME}'.*has no elements"):
        convert_checkpoint(src, tmp_path / "dst", conversion=conversion, progress=False)
    assert not (tmp_path / "dst").exists()


def test_zero_size_tensors_still_cast():
    c = cc.load_registry().get("bf16_cast")
    (out, _) = c.convert(torch.zeros(0, 8))
    assert out.shape == (0, 8) and out.dtype == torch.bfloat16


def broken(shape):
    raise RuntimeError("plugin bug in its shape function")


@pytest.mark.parametrize("field", ["scale_shape", "out_shape"])
def test_a_raising_shape_function_is_one_line_naming_the_conversion(field):
    c = cc.load_registry().get("cutlass_fp8_e4m3_per_channel").replace(name="zz_broken_shape", **{field: broken})
    x = torch.randn(4, 8)
    for call in (lambda: c.allocate(x.shape), lambda: c.convert(x), lambda: c.fn(x, torch.empty(4, 8), None)):
        with pytest.raises(
            cc.ConversionTypeError, match=r"'zz_broken_shape'.*shape function failed.*\(4, 8\).*plugin bug"
        ):
            call()
    from conversion_core.plan.decide import TensorSpec, converted_entry

    with pytest.raises(cc.ConversionTypeError, match=r"tensor 'w'.*'zz_broken_shape'.*plugin bug"):
        converted_entry("w", TensorSpec((4, 8), torch.float32), c, c.target_format({}), None)


@pytest.mark.parametrize("conversion", [*QUANTIZING, "bf16_cast", "fp32_cast"])
def test_requires_grad_sources_give_plain_outputs_with_the_same_bytes(conversion):
    c = cc.load_registry().get(conversion)
    w = torch.randn(130, 260, requires_grad=True)
    expected = c.convert(w.detach())
    for got in (c.convert(w), c.convert(w[:, 3:200])):  # a strided view of a grad-requiring leaf too
        assert not any(t.requires_grad for t in got if t is not None)
    got = c.convert(w)
    for a, b in zip(got, expected, strict=True):
        if a is not None:
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    plan = build_plan({NAME: w}, conversion=conversion)
    outputs = plan.allocate("cpu")
    plan.run({NAME: w})
    assert not any(t.requires_grad for t in outputs.values())
