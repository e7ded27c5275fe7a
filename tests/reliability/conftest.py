"""Tiny llama-like checkpoints for the publishing tests (built here, not through conversion-core)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # plan_expectations

from plan_expectations import needs_builtin_plugins  # noqa: E402

from conversion_core.apps import publish  # noqa: E402

CONVERSION = "fp8_128x128"


def write_tiny(path: Path, seed: int) -> Path:
    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    names = ["model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight"]
    state = {n: torch.randn(256, 256, generator=g).to(torch.bfloat16) for n in names}
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "seed": seed}))
    return path


def snapshot(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.fixture(scope="session")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    return write_tiny(root / "a", 1), write_tiny(root / "b", 2)


@pytest.fixture(scope="session")
def outputs(sources, tmp_path_factory):
    """The complete converted result of each source, to compare DST against."""
    from conversion_core.apps.checkpoint import convert_checkpoint

    root = tmp_path_factory.mktemp("expected")
    out = []
    for i, src in enumerate(sources):
        convert_checkpoint(src, root / str(i), conversion=CONVERSION, progress=False)
        out.append(snapshot(root / str(i)))
    return out


@pytest.fixture(autouse=True)
def _no_hook(monkeypatch):
    monkeypatch.setattr(publish, "fault_hook", None)
    monkeypatch.setattr(publish, "use_exchange", True)


pytestmark = needs_builtin_plugins
