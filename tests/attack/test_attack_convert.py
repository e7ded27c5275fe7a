"""Attacks on ``conversion-core convert``: hostile source directories, lying files, hostile plugins.

Every bad input must end in one line naming the file, tensor, plugin or key at fault, before
anything is published, and DST's parent must hold no leftovers afterwards.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from plan_expectations import needs_builtin_plugins
from safetensors.torch import load_file, save_file

import conversion_core as cc
from conversion_core.apps.checkpoint import convert_checkpoint
from conversion_core.apps.cli import main
from conversion_core.loading.plugins import PluginInfo, RegisteredRule
from conversion_core.loading.registry import Registry

NAME = "model.layers.0.mlp.up_proj.weight"
pytestmark = needs_builtin_plugins


def checkpoint(path: Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    path.mkdir(parents=True)
    save_file(state or {NAME: torch.randn(8, 8).to(torch.bfloat16)}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return path


def sharded(path: Path, weight_map: dict[str, str], files: dict[str, dict[str, torch.Tensor]]) -> Path:
    path.mkdir(parents=True)
    for file, state in files.items():
        save_file(state, str(path / file))
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return path


def one_line_cli(capsys, src: Path, dst: Path, conversion: str = "bf16_cast") -> str:
    assert main(["convert", str(src), str(dst), "--conversion", conversion, "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def leftovers(parent: Path, *expected: str) -> None:
    assert sorted(p.name for p in parent.iterdir()) == sorted(expected)


# ---- (1) the source directory's tree ---------------------------------------------------------


def test_a_symlink_loop_in_src_is_one_short_line_before_any_work(tmp_path, capsys, monkeypatch):
    src = checkpoint(tmp_path / "src")
    os.symlink(src, src / "self")
    ran = []
    monkeypatch.setattr("conversion_core.apps.checkpoint.run_pipeline", lambda *a, **k: ran.append(1))
    line = one_line_cli(capsys, src, tmp_path / "dst")
    assert "symlink loop" in line and str(src / "self") in line and len(line) < 400
    assert not ran  # refused before converting anything
    leftovers(tmp_path, "src")


def test_a_deeper_symlink_loop_is_refused(tmp_path, capsys):
    src = checkpoint(tmp_path / "src")
    (src / "a" / "b").mkdir(parents=True)
    os.symlink("../..", src / "a" / "b" / "up")
    line = one_line_cli(capsys, src, tmp_path / "dst")
    assert "symlink loop" in line and str(src / "a" / "b" / "up") in line
    leftovers(tmp_path, "src")


def test_a_directory_reached_twice_through_symlinks_is_copied_without_a_loop_error(tmp_path):
    src = checkpoint(tmp_path / "src")
    (src / "extra").mkdir()
    (src / "extra" / "notes.txt").write_text("hi")
    os.symlink("extra", src / "alias")  # no loop: a second name for a sibling
    convert_checkpoint(src, tmp_path / "dst", conversion="bf16_cast", progress=False)
    assert (tmp_path / "dst" / "alias" / "notes.txt").read_text() == "hi"
    assert (tmp_path / "dst" / "extra" / "notes.txt").read_text() == "hi"


@pytest.mark.parametrize("weights", ["sub/model-00002.safetensors", "sub/pytorch_model.bin", "a/b/m.safetensors"])
def test_weights_in_a_subdirectory_are_refused_not_copied_unconverted(tmp_path, capsys, weights):
    src = checkpoint(tmp_path / "src")
    path = src / weights
    path.parent.mkdir(parents=True)
    save_file({"x": torch.randn(4, 4)}, str(path))
    line = one_line_cli(capsys, src, tmp_path / "dst")
    assert str(path) in line and "subdirectory" in line
    leftovers(tmp_path, "src")


def test_weights_only_in_a_subdirectory_say_where_they_are(tmp_path, capsys):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    save_file({NAME: torch.randn(4, 4)}, str(src / "sub" / "model.safetensors"))
    line = one_line_cli(capsys, src, tmp_path / "dst")
    assert str(src / "sub" / "model.safetensors") in line
    leftovers(tmp_path, "src")


def test_other_files_in_subdirectories_are_still_copied(tmp_path):
    src = checkpoint(tmp_path / "src")
    (src / "tok" / "deep").mkdir(parents=True)
    (src / "tok" / "deep" / "vocab.txt").write_text("a b c")
    (src / "tokenizer.json").write_text("{}")
    convert_checkpoint(src, tmp_path / "dst", conversion="bf16_cast", progress=False)
    assert (tmp_path / "dst" / "tok" / "deep" / "vocab.txt").read_text() == "a b c"
    assert (tmp_path / "dst" / "tokenizer.json").read_text() == "{}"


def test_a_dangling_symlink_is_one_line_naming_it_before_any_work(tmp_path, capsys, monkeypatch):
    src = checkpoint(tmp_path / "src")
    os.symlink(tmp_path / "gone", src / "tokenizer.json")
    ran = []
    monkeypatch.setattr("conversion_core.apps.checkpoint.run_pipeline", lambda *a, **k: ran.append(1))
    line = one_line_cli(capsys, src, tmp_path / "dst")
    assert str(src / "tokenizer.json") in line and "dangling" in line and "writing" not in line
    assert not ran
    leftovers(tmp_path, "src")


def test_a_named_pipe_in_src_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    src = checkpoint(tmp_path / "src")
    os.mkfifo(src / "tokenizer.json")
    ran = []
    monkeypatch.setattr("conversion_core.apps.checkpoint.run_pipeline", lambda *a, **k: ran.append(1))
    line = one_line_cli(capsys, src, tmp_path / "dst")
    assert str(src / "tokenizer.json") in line and "not a regular file" in line
    assert not ran
    leftovers(tmp_path, "src")


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_a_directory_where_a_json_file_belongs_is_refused_not_ignored(tmp_path, capsys, name):
    src = checkpoint(tmp_path / "src")
    (src / name).unlink(missing_ok=True)
    (src / name).mkdir()
    line = one_line_cli(capsys, src, tmp_path / "dst")
    assert str(src / name) in line and "not a file" in line
    leftovers(tmp_path, "src")


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_json_nested_too_deeply_is_one_line(tmp_path, capsys, name):
    src = checkpoint(tmp_path / "src")
    deep = "[" * 100_000 + "]" * 100_000
    (src / name).write_text('{"weight_map": ' + deep + "}")
    line = one_line_cli(capsys, src, tmp_path / "dst")
    assert str(src / name) in line and "nested" in line
    leftovers(tmp_path, "src")


# ---- index files and shards ---------------------------------------------------------------


def test_a_shard_the_index_does_not_name_is_refused_not_dropped(tmp_path, capsys):
    other = "model.layers.0.mlp.down_proj.weight"
    t = lambda: torch.randn(8, 8).to(torch.bfloat16)  # noqa: E731
    files = {"a.safetensors": {NAME: t()}, "b.safetensors": {other: t()}}
    src = sharded(tmp_path / "src", {NAME: "a.safetensors"}, files)
    line = one_line_cli(capsys, src, tmp_path / "dst")
    assert str(src / "b.safetensors") in line and "model.safetensors.index.json" in line
    leftovers(tmp_path, "src")


def test_a_tensor_in_an_unindexed_second_shard_is_refused(tmp_path, capsys):
    t = lambda: torch.randn(8, 8).to(torch.bfloat16)  # noqa: E731
    files = {"a.safetensors": {NAME: t()}, "b.safetensors": {NAME: t()}}
    src = sharded(tmp_path / "src", {NAME: "a.safetensors"}, files)
    line = one_line_cli(capsys, src, tmp_path / "dst")
    assert str(src / "b.safetensors") in line
    leftovers(tmp_path, "src")


def test_an_index_naming_one_tensor_twice_is_refused(tmp_path, capsys):
    t = lambda: torch.randn(8, 8).to(torch.bfloat16)  # noqa: E731
    src = sharded(tmp_path / "src", {}, {"a.safetensors": {NAME: t()}, "b.safetensors": {NAME: t()}})
    text = json.dumps({"weight_map": {NAME: "a.safetensors", "SECOND": "b.safetensors"}}).replace("SECOND", NAME)
    (src / "model.safetensors.index.json").write_text(text)
    line = one_line_cli(capsys, src, tmp_path / "dst")
    assert NAME in line and "twice" in line
    leftovers(tmp_path, "src")


def test_a_safetensors_header_naming_one_tensor_twice_is_refused(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    data = torch.randn(8, 8).view(torch.uint8).numpy().tobytes()
    entry = '"%s": {"dtype": "%s", "shape": %s, "data_offsets": [0, 256]}'
    header = ("{" + entry % (NAME, "F32", "[8, 8]") + ", " + entry % (NAME, "BF16", "[8, 16]") + "}").encode()
    header += b" " * (-len(header) % 8)
    (src / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + data)
    line = one_line_cli(capsys, src, tmp_path / "dst")
    assert str(src / "model.safetensors") in line and NAME in line and "twice" in line
    leftovers(tmp_path, "src")


# ---- non-finite bytes written ------------------------------------------------------------


def test_a_cast_that_overflows_to_inf_is_refused_naming_the_tensor(tmp_path, capsys):
    src = checkpoint(tmp_path / "src", {NAME: torch.full((4, 4), 3.4e38)})  # finite fp32, past bf16's max
    line = one_line_cli(capsys, src, tmp_path / "dst")
    assert NAME in line and "Inf" in line
    leftovers(tmp_path, "src")


def test_edge_tensors_convert(tmp_path):
    state = {
        NAME: torch.randn(128, 128).to(torch.bfloat16),
        "model.norm.weight": torch.ones(0, dtype=torch.bfloat16),  # empty, kept
        "model.scalar": torch.tensor(2.0, dtype=torch.bfloat16),  # 0-dim, kept
        "model.odd\nname\u202e.bias": torch.ones(3, dtype=torch.bfloat16),  # odd characters, kept
    }
    src = checkpoint(tmp_path / "src", state)
    convert_checkpoint(src, tmp_path / "dst", conversion="fp8_128x128", progress=False)
    got = load_file(tmp_path / "dst" / "model.safetensors")
    for name in ("model.norm.weight", "model.scalar", "model.odd\nname\u202e.bias"):
        assert torch.equal(got[name], state[name])
    assert got[NAME].dtype == torch.float8_e4m3fn


# ---- a plugin's checkpoint config ---------------------------------------------------------


def _copy(src, out, scale_out):
    out.copy_(src)


def evil_registry(writer) -> Registry:
    """One plugin, ``evilplug``, whose target format writes ``writer(kept)`` as the quantization_config."""
    conversion = cc.Conversion(
        name="evil",
        fn=_copy,
        requires_scale=False,
        dst_dtype=torch.float32,
        compile_target="evil_target",
        target_format=lambda qc: cc.TargetFormat(quantization_config=writer),
    )
    rule = cc.Rule(conversion="evil", predicate=lambda qc: qc.get("quant_method") == "evil", name="evil_rule")
    info = PluginInfo("evilplug", "evil-dist", "1.0", "loaded", conversions=("evil",), rules=("evil_rule",))
    return Registry([info], [(conversion, "evilplug")], [RegisteredRule(rule, "evilplug", 0)])


def _raises(kept):
    raise RuntimeError("boom")


@pytest.mark.parametrize(
    "writer",
    [
        pytest.param(lambda kept: {"quant_method": "evil", "x": {1, 2}}, id="set"),
        pytest.param(lambda kept: {"quant_method": "evil", "x": torch.ones(2)}, id="tensor"),
        pytest.param(lambda kept: {"quant_method": "evil", "x": [object()]}, id="nested-object"),
        pytest.param(lambda kept: {"quant_method": "evil", "x": float("nan")}, id="nan"),
        pytest.param(lambda kept: {"quant_method": "evil", 1: "a"}, id="int-key"),
        pytest.param(lambda kept: ["quant_method"], id="list"),
        pytest.param(_raises, id="raises"),
    ],
)
def test_a_plugin_config_that_is_not_plain_json_is_one_line_naming_the_plugin(tmp_path, writer):
    src = checkpoint(tmp_path / "src")
    with pytest.raises(cc.ConversionCoreError) as info:
        convert_checkpoint(src, tmp_path / "dst", conversion="evil", registry=evil_registry(writer), progress=False)
    text = str(info.value)
    assert len(text.splitlines()) == 1 and "evilplug" in text and "'evil'" in text, text
    leftovers(tmp_path, "src")


def test_a_plugin_config_that_changes_on_its_way_through_json_is_read_back_as_written(tmp_path):
    """A tuple is written as a list: the read-back check must see what the file will hold."""
    src = checkpoint(tmp_path / "src")
    registry = evil_registry(lambda kept: {"quant_method": "evil", "block": (128, 128)})
    convert_checkpoint(src, tmp_path / "dst", conversion="evil", registry=registry, progress=False)
    written = json.loads((tmp_path / "dst" / "config.json").read_text())
    assert written["quantization_config"] == {"quant_method": "evil", "block": [128, 128]}


def test_a_like_config_with_a_non_json_value_is_one_line(tmp_path):
    src = checkpoint(tmp_path / "src")
    conversion = cc.Conversion(name="plain", fn=_copy, requires_scale=False, dst_dtype=torch.float32)
    rule = cc.Rule(conversion="plain", predicate=lambda qc: qc.get("quant_method") == "plain", name="r")
    info = PluginInfo("plainplug", "plain-dist", "1.0", "loaded", conversions=("plain",), rules=("r",))
    registry = Registry([info], [(conversion, "plainplug")], [RegisteredRule(rule, "plainplug", 0)])
    with pytest.raises(cc.ConversionCoreError, match="quantization_config") as exc:
        convert_checkpoint(
            src, tmp_path / "dst", like={"quant_method": "plain", "x": torch.float32}, registry=registry, progress=False
        )
    assert len(str(exc.value).splitlines()) == 1
    leftovers(tmp_path, "src")


# ---- SRC and DST arguments ----------------------------------------------------------------


@pytest.mark.parametrize("which", ["src", "dst"])
def test_an_empty_path_is_refused_not_read_as_the_current_directory(tmp_path, capsys, monkeypatch, which):
    """``convert SRC "$OUT" --force`` with OUT unset must not replace the current directory."""
    src = checkpoint(tmp_path / "src")
    work = tmp_path / "work"
    work.mkdir()
    (work / "precious.txt").write_text("mine")
    monkeypatch.chdir(work)
    args = {"src": str(src), "dst": str(tmp_path / "dst"), which: ""}
    argv = ["convert", args["src"], args["dst"], "--conversion", "bf16_cast", "--no-progress", "--force"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and which.upper() in err[0] and "empty" in err[0], err
    assert sorted(p.name for p in work.iterdir()) == ["precious.txt"]
    leftovers(tmp_path, "src", "work")


@pytest.mark.parametrize("which", ["src", "dst"])
def test_an_unknown_user_in_a_tilde_path_is_one_line(tmp_path, capsys, which):
    src = checkpoint(tmp_path / "src")
    args = {"src": str(src), "dst": str(tmp_path / "dst"), which: "~no_such_user_cc_attack/x"}
    assert main(["convert", args["src"], args["dst"], "--conversion", "bf16_cast", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "~no_such_user_cc_attack" in err[0], err
    leftovers(tmp_path, "src")


# ---- publishing ---------------------------------------------------------------------------


@pytest.mark.parametrize("other", ["out.tmp-x", "out.old-x"])
def test_a_run_never_takes_the_temporaries_of_a_dst_whose_name_extends_its_own(tmp_path, other):
    """DST ``out`` must not treat ``.out.tmp-x.tmp-XXXXXXXX`` (a live run on ``out.tmp-x``) as its own leftover."""
    from conversion_core.apps import publish

    src = checkpoint(tmp_path / "src")
    live = publish.Publication(tmp_path / other, force=False)
    tmp = live.open()
    old = tmp_path / f".{other}.old-0123abcd"  # what that run's replace leaves for an instant
    old.mkdir()
    (old / "config.json").write_text("{}")
    try:
        (tmp / "half.txt").write_text("being written")
        convert_checkpoint(src, tmp_path / "out", conversion="bf16_cast", progress=False)
        assert (tmp / "half.txt").read_text() == "being written" and old.is_dir()
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "conversion_manifest.json",
                                                                        "model.safetensors"]  # fmt: skip
    finally:
        live.close()
