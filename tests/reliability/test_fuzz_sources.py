"""Hypothesis fuzzing of what ``convert`` reads: safetensors headers and index files.

Whatever the bytes, ``convert`` either succeeds or raises a ``ConversionCoreError`` whose message
is one line; it never raises another exception type, never leaves DST or a temporary directory
behind on failure, and never modifies SRC.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import conversion_core as cc
from conversion_core.apps.checkpoint import convert_checkpoint

EXAMPLES = int(os.environ.get("CONVERSION_CORE_HYPOTHESIS_EXAMPLES", "60"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))

DTYPES = ["BF16", "F16", "F32", "F64", "I8", "U8", "I32", "I64", "BOOL", "F8_E4M3", "F8_E5M2", "F8_E8M0", "U16", "X"]
NAMES = st.sampled_from(
    ["model.layers.0.mlp.up_proj.weight", "model.norm.weight", "lm_head.weight", "x.qweight", "a.weight_scale", "", "."]
)
JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
ENTRY = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(DTYPES) | JSONISH,
        "shape": st.lists(st.integers(-1, 300), max_size=4) | JSONISH,
        "data_offsets": st.lists(st.integers(-4, 1 << 20), min_size=0, max_size=3) | JSONISH,
    }
)
HEADER = st.dictionaries(NAMES, ENTRY | JSONISH, max_size=3)


def run(src: Path, root: Path) -> None:
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    try:
        convert_checkpoint(src, root / "dst", conversion="bf16_cast", progress=False)
    except cc.ConversionCoreError as exc:
        assert "\n" not in str(exc).strip(), str(exc)
        assert sorted(p.name for p in root.iterdir()) == ["src"], sorted(root.iterdir())
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


def fresh() -> tuple[Path, Path]:
    root = Path(tempfile.mkdtemp(prefix="cc-fuzz-"))
    src = root / "src"
    src.mkdir()
    (src / "config.json").write_text('{"model_type": "llama"}')
    return root, src


@SETTINGS
@given(header=HEADER, declared=st.integers(-8, 4096) | st.none(), tail=st.binary(max_size=256))
def test_any_safetensors_header_is_converted_or_refused_in_one_line(header, declared, tail):
    root, src = fresh()
    try:
        body = json.dumps(header).encode()
        size = len(body) if declared is None else declared
        (src / "model.safetensors").write_bytes(struct.pack("<q", size) + body + tail)
        run(src, root)
    finally:
        shutil.rmtree(root)


@SETTINGS
@given(index=JSONISH | st.fixed_dictionaries({"weight_map": st.dictionaries(NAMES, JSONISH | st.text(max_size=12))}))
def test_any_index_file_is_converted_or_refused_in_one_line(index):
    import torch
    from safetensors.torch import save_file

    root, src = fresh()
    try:
        save_file({"model.norm.weight": torch.ones(4)}, str(src / "model-00001-of-00001.safetensors"))
        (src / "model.safetensors.index.json").write_text(json.dumps(index))
        run(src, root)
    finally:
        shutil.rmtree(root)
