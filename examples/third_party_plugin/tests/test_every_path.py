"""The example plugin through every path of the core, with no core edit: the whole-model plan
(checked and launched), ``convert --conversion``, ``convert --like``, the CLI, and DTensor sources.

Expectations are independent of the paths under test: every quantized tensor's bytes are those of
a reference written here from the format's definition (one amax per tensor, ``scale = max(amax,
1e-12) / 448``, e4m3 round-to-nearest-even via ``e4m3_reference_bytes``), every kept tensor's bytes
are the source's.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch

import conversion_core as cc
from conversion_core.backend import BACKEND_ENV, triton_available
from conversion_core.plan import build_plan
from conversion_core.testing import e4m3_reference_bytes

NAME = "fp8_per_tensor"
H, INTER, V = 24, 40, 30
QUANTIZED = [f"model.layers.{n}.{m}" for n in (0, 1) for m in ("self_attn.q_proj", "mlp.up_proj", "mlp.down_proj")]
LIKE = {
    "model_type": "llama",
    "quantization_config": {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True},
            }
        },
        "ignore": ["lm_head", "re:.*layers\\.1\\.mlp\\..*"],
    },
}


@pytest.fixture(scope="module", autouse=True)
def registered() -> None:
    if NAME not in cc.load_registry(reload=True).names():
        pytest.fail("fp8_per_tensor is not registered: pip install -e examples/third_party_plugin")


def source_state(seed: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}
    for n in (0, 1):
        shapes[f"model.layers.{n}.input_layernorm.weight"] = (H,)
        shapes[f"model.layers.{n}.self_attn.q_proj.weight"] = (H, H)
        shapes[f"model.layers.{n}.mlp.up_proj.weight"] = (INTER, H)
        shapes[f"model.layers.{n}.mlp.down_proj.weight"] = (H, INTER)
    state = {n: torch.randn(s, generator=g).bfloat16() for n, s in shapes.items()}
    state["model.layers.0.mlp.up_proj.weight"][3, 5] = 300.0  # an outlier sets its tensor's scale
    return state


def reference(src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 bytes and the float32 scale (1,), from the format's definition."""
    x = src.float()
    scale = torch.maximum(x.abs().max(), torch.tensor(1e-12)) / torch.tensor(448.0)
    return e4m3_reference_bytes((x / scale).clamp(-448, 448)), scale.reshape(1)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def expected(state: dict[str, torch.Tensor], quantized: list[str]) -> dict[str, torch.Tensor]:
    """name -> bytes as the inference side stores them (FP8 as uint8 bytes)."""
    want: dict[str, torch.Tensor] = {}
    for name, src in state.items():
        module = name.removesuffix(".weight")
        if module in quantized:
            q, scale = reference(src)
            want[name], want[module + ".weight_scale"] = q, scale
        else:
            want[name] = src
    return want


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        assert tuple(got[name].shape) == tuple(w.shape), name
        assert torch.equal(_bits(got[name]), _bits(w)), name


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_plan_checked_and_launched(monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    """The checked step (backend torch) and the launched step (the plugin's ``launch``, one flag
    read per step; on CPU it needs Triton's interpreter) write the same, reference bytes."""
    if backend == "triton" and not (triton_available() and os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("the launched step on CPU needs triton and TRITON_INTERPRET=1 (the nox all session)")
    monkeypatch.setenv(BACKEND_ENV, backend)
    state = source_state()
    plan = build_plan(state, conversion=NAME)
    outputs = plan.allocate("cpu")
    got = plan.run(state)
    assert all(got[k] is outputs[k] for k in got)
    assert_same(got, expected(state, QUANTIZED))
    fresh = source_state(seed=4)  # in place, as an optimizer step: the same buffers refilled
    for name, t in state.items():
        t.copy_(fresh[name])
    assert_same(plan.run(state), expected(state, QUANTIZED))
    state["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    with pytest.raises(cc.ConversionInputError, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
        plan.run(state)


def _read(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def _write_source(path: Path, state: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": H}))
    save_file(state, str(path / "model.safetensors"))
    return path


@pytest.mark.parametrize("how", ["--conversion", "--like"])
def test_convert_cli(tmp_path: Path, how: str) -> None:
    pytest.importorskip("safetensors.torch", reason="convert needs the [hf] extra")
    pytest.importorskip("tqdm", reason="convert needs the [hf] extra")
    from conversion_core.apps.cli import main as cli_main

    state = source_state()
    src = _write_source(tmp_path / "src", state)
    if how == "--conversion":
        which, quantized = [how, NAME], QUANTIZED
    else:
        like = tmp_path / "like.json"
        like.write_text(json.dumps(LIKE))
        which, quantized = [how, str(like)], [m for m in QUANTIZED if not m.startswith("model.layers.1.mlp")]
    assert cli_main(["convert", str(src), str(tmp_path / "dst"), *which, "--no-progress"]) == 0
    got = _read(tmp_path / "dst")
    assert_same(got, expected(state, quantized))
    assert all(got[m + ".weight"].dtype == torch.float8_e4m3fn for m in quantized)
    config = json.loads((tmp_path / "dst" / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"]["strategy"] == "tensor"
    assert cc.select_default_conversion(config) == NAME  # the written checkpoint reads back as this format
    kept = {"lm_head", "model.embed_tokens"} | {m for m in QUANTIZED if m not in quantized}
    assert kept <= set(qc["ignore"]), qc["ignore"]


# DTensor sources: two gloo processes, each case's outcome collected per rank.
CASES = {  # name -> (shape, placement dim or None for Replicate, all-reduces expected)
    "rows_S0": ((64, 48), 0, 1),
    "cols_S1_uneven": ((33, 77), 1, 1),
    "experts_S0": ((3, 40, 50), 0, 1),
    "experts_S2": ((2, 40, 33), 2, 1),
    "replicated": ((40, 50), None, 0),
}
WORLD, DEADLINE_S = 2, 180


def _run_case(name: str, mesh) -> None:  # type: ignore[no-untyped-def]
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.debug import CommDebugMode

    shape, dim, reduces = CASES[name]
    full = (torch.randn(shape, generator=torch.Generator().manual_seed(len(name))) * 3).bfloat16()
    full.view(-1)[-1] = 500.0  # an outlier only the last rank sees when sharded
    src = distribute_tensor(full, mesh, [Replicate() if dim is None else Shard(dim)], src_data_rank=None)
    conversion = cc.load_registry().get(NAME)
    with CommDebugMode() as comm:
        q, scale = conversion.convert(src)
    assert comm.get_total_counts() == reduces, comm.get_total_counts()
    want_q, want_scale = reference(full)
    # gloo gathers no float8: compare each rank's bytes with the reference cut the same way
    assert list(q.placements) == list(src.placements)
    local_want = distribute_tensor(want_q.view(full.shape), mesh, src.placements, src_data_rank=None).to_local()
    assert torch.equal(_bits(q.to_local()), _bits(local_want)), "e4m3 bytes differ from the unsharded reference"
    assert torch.equal(scale.full_tensor(), want_scale), "the tensor's one scale differs"


def _worker(rank: int, store: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    results = {}
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        for name in CASES:
            try:
                _run_case(name, mesh)
                results[name] = "ok"
            except Exception:
                results[name] = traceback.format_exc()
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def world() -> list[dict[str, str]]:
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        context = mp.start_processes(
            _worker, args=(os.path.join(tmp, "store"), tmp), nprocs=WORLD, start_method="fork", join=False
        )
        deadline = time.monotonic() + DEADLINE_S
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                pytest.fail(f"the {WORLD}-process gloo world did not finish within {DEADLINE_S} s")
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.parametrize("name", list(CASES))
def test_dtensor_source(world: list[dict[str, str]], name: str) -> None:
    failures = [f"rank {r}: {res.get(name, 'did not run')}" for r, res in enumerate(world) if res.get(name) != "ok"]
    assert not failures, "\n".join(failures)
