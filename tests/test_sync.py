"""The receiving end and the bucketed sender: refuse before any byte, digests, bytes, bounded memory.

Expectations are independent of the sync code: the receiver's bytes are compared with the plan
converting every tensor whole (``Plan.allocate`` + ``Plan.run``), refusals with buffers snapshotted
before the update, the memory bound with the allocations torch's profiler records.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
from plan_expectations import needs_builtin_plugins
from torch.profiler import ProfilerActivity, profile

from conversion_core.errors import ConversionInputError
from conversion_core.plan import build_plan
from conversion_core.plan.buckets import bucket_layout, layout_from_json, layout_to_json
from conversion_core.plan.sync import BucketSender, SyncRefused, receive_update
from conversion_core.selection import Receiver, check, digest, expectations

pytestmark = needs_builtin_plugins

BLOCK = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
CHANNEL = {"quant_method": "fp8", "activation_scheme": "dynamic"}
NO_QUANT: dict[str, Any] = {}


def model_state(layers: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """A small MoE-like state dict: awkward shapes (K not a multiple of 128, 1-row, 3D experts)."""
    g = torch.Generator().manual_seed(seed)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (96, 136)}
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.input_layernorm.weight": (136,),
            f"{p}.self_attn.q_proj.weight": (130, 136),
            f"{p}.self_attn.o_proj.weight": (136, 130),
            f"{p}.mlp.gate.weight": (3, 136),
            f"{p}.mlp.experts.gate_up_proj": (3, 2 * 72, 136),
            f"{p}.mlp.experts.down_proj": (3, 136, 72),
            f"{p}.mlp.one_row.weight": (1, 200),
        }
    shapes["lm_head.weight"] = (96, 136)
    return {n: torch.randn(s, generator=g).to(torch.bfloat16) for n, s in shapes.items()}


def whole_outputs(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    plan = build_plan(state, config)
    plan.allocate("cpu")
    return plan.run(state)


def receiver_for(state: dict[str, torch.Tensor], config: Any, fill: int = 0x5A) -> Receiver:
    """The engine's buffers, allocated from its own config (a plan over meta specs), filled with a marker."""
    specs = {n: (tuple(t.shape), t.dtype) for n, t in state.items()}
    buffers = build_plan(specs, config).allocate("cpu")
    for b in buffers.values():
        b.view(torch.uint8).fill_(fill)
    return Receiver(buffers, config)


def snapshot(receiver: Receiver) -> dict[str, bytes]:
    return {n: bytes(b.reshape(-1).view(torch.uint8).numpy()) for n, b in receiver.buffers.items()}


class Pipe:
    """One end of an in-process link: isend enqueues a copy, recv dequeues into the given tensor."""

    def __init__(self, out: queue.Queue, inbox: queue.Queue):
        self.out, self.inbox = out, inbox
        self.sent_tensor_bytes = 0

    def isend(self, payload: torch.Tensor) -> Any:
        self.out.put(payload.clone())
        self.sent_tensor_bytes += payload.numel() * payload.element_size()
        return _Done()

    def recv(self, payload: torch.Tensor) -> None:
        got = self.inbox.get(timeout=60)
        assert got.shape == payload.shape and got.dtype == payload.dtype, (got.shape, payload.shape)
        payload.copy_(got)

    def irecv(self, payload: torch.Tensor) -> Any:
        return _Later(self, payload)


class _Done:
    def wait(self) -> None:
        return None


class _Later:
    def __init__(self, pipe: Pipe, payload: torch.Tensor):
        self.pipe, self.payload = pipe, payload

    def wait(self) -> None:
        self.pipe.recv(self.payload)


def pair() -> tuple[Pipe, Pipe]:
    a, b = queue.Queue(), queue.Queue()
    return Pipe(a, b), Pipe(b, a)


def sync_once(
    sender: BucketSender, receiver: Receiver, state: dict[str, torch.Tensor], wire: Pipe, end: Pipe
) -> tuple[Any, BaseException | None]:
    """The sender's step on a thread, the receiver here; returns the receive result and the sender's error."""
    sender.transport = wire
    error: list[BaseException] = []

    def run() -> None:
        try:
            sender.step(state)
        except BaseException as exc:  # noqa: B036  reported to the test
            error.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        result = receive_update(receiver, end)
    finally:
        thread.join(timeout=60)
    return result, (error[0] if error else None)


# ---- the check: every mismatch class refused, nothing written ---------------------------------


def tamper(manifest: dict[str, Any], how: str) -> dict[str, Any]:
    m = json.loads(json.dumps(manifest))
    entry = next(e for e in m["tensors"] if e["kept"] is None and e["name"].endswith("q_proj.weight"))
    if how == "missing":
        m["tensors"].remove(entry)
    elif how == "extra":
        extra = json.loads(json.dumps(entry))
        extra["name"] = "model.layers.9.self_attn.q_proj.weight"
        for o in extra["outputs"]:
            o["name"] = o["name"].replace("layers.0", "layers.9")
        m["tensors"].append(extra)
    elif how == "dtype":
        entry["outputs"][1]["dtype"] = "bfloat16"
    elif how == "shape":
        entry["outputs"][0]["shape"] = [entry["outputs"][0]["shape"][1], entry["outputs"][0]["shape"][0]]
    elif how == "compile_target":
        entry["compile_target"] = entry["compile_target"] + "_ue8m0"
    elif how == "metadata":
        entry["compile_metadata"] = dict(entry["compile_metadata"], scale_fmt="ue8m0")
    elif how == "manifest":
        m["format_version"] = 1
    return m


@pytest.mark.parametrize("how", ["missing", "extra", "dtype", "shape", "compile_target", "metadata", "manifest"])
def test_each_mismatch_class_is_refused_with_its_kind_in_the_diff(how: str) -> None:
    state = model_state(1)
    receiver = receiver_for(state, BLOCK)
    good = build_plan(state, BLOCK).manifest()
    assert receiver.check(good).accepted
    verdict = receiver.check(tamper(good, how))
    assert not verdict.accepted
    assert {p.kind for p in verdict.problems} == {how}
    assert verdict.diff().startswith("refused: ") and f"\n  {how}" in verdict.diff()
    before = snapshot(receiver)
    incoming = {n: torch.zeros_like(b) for n, b in receiver.buffers.items()}
    with pytest.raises(ConversionInputError, match="refused"):
        receiver.apply(verdict, incoming)
    assert snapshot(receiver) == before


@pytest.mark.parametrize("sender_config", [CHANNEL, NO_QUANT])
def test_a_sender_of_another_format_is_refused_before_any_byte_moves(sender_config: Any) -> None:
    state = model_state(2)
    receiver = receiver_for(state, BLOCK)
    before = snapshot(receiver)
    wire, end = pair()
    sender = BucketSender(build_plan(state, sender_config), bucket_bytes=1 << 16)
    result, error = sync_once(sender, receiver, state, wire, end)
    assert not result.verdict.accepted and result.bytes_received == 0
    kinds = {p.kind for p in result.verdict.problems}
    assert "compile_target" in kinds or "dtype" in kinds
    assert isinstance(error, SyncRefused) and "refused" in str(error)
    assert wire.sent_tensor_bytes < 20_000  # the offer only (two small messages), no bucket
    assert snapshot(receiver) == before


def test_expectations_come_from_the_receivers_own_config_and_names() -> None:
    state = model_state(1)
    receiver = receiver_for(state, BLOCK)
    tags = {n: (e.compile_target, dict(e.compile_metadata)) for n, e in receiver.expected.tensors.items()}
    assert tags["model.layers.0.self_attn.q_proj.weight"][0] == "deep_gemm_fp8"
    assert tags["model.layers.0.self_attn.q_proj.weight_scale_inv"][0] == "deep_gemm_fp8"
    assert tags["model.layers.0.mlp.experts.gate_up_proj_scale_inv"][0] == "deep_gemm_fp8"
    assert tags["model.layers.0.mlp.gate.weight"] == ("hf_raw", {})  # the router stays bf16
    assert tags["lm_head.weight"] == ("hf_raw", {})
    plain = expectations({n: (tuple(t.shape), t.dtype) for n, t in state.items()}, NO_QUANT)
    assert {e.compile_target for e in plain.tensors.values()} == {"hf_raw"}
    assert check(plain, build_plan(state, NO_QUANT).manifest()).accepted


# ---- digests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("nbytes", [1, 3, 4, 7, 64, 257])
def test_digest_changes_for_every_single_flipped_byte(nbytes: int) -> None:
    data = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(nbytes))
    base = digest(data)
    for i in range(nbytes):
        for bit in (0, 7):
            flipped = data.clone()
            flipped[i] ^= 1 << bit
            assert digest(flipped) != base, (i, bit)
    if nbytes >= 8:  # two words swapped: same sum, different weighted sum
        words = data[: nbytes // 4 * 4].view(torch.int32).clone()
        if words[0] != words[1]:
            words[[0, 1]] = words[[1, 0]]
            swapped = torch.cat([words.view(torch.uint8), data[nbytes // 4 * 4 :]])
            assert digest(swapped)[0] == base[0] and digest(swapped)[1] != base[1]


def test_digest_reads_bytes_not_values_and_any_dtype() -> None:
    x = torch.tensor([0.0, 1.0], dtype=torch.float32)
    y = torch.tensor([-0.0, 1.0], dtype=torch.float32)  # equal values, different bytes
    assert digest(x) != digest(y)
    assert digest(x) == digest(x.view(torch.uint8).clone())
    assert digest(torch.ones(5, dtype=torch.float8_e4m3fn)) == digest(torch.ones(5, dtype=torch.float8_e4m3fn))


def test_a_byte_flipped_on_the_wire_is_caught_and_its_bucket_not_written() -> None:
    state = model_state(2)
    receiver = receiver_for(state, BLOCK)
    before = snapshot(receiver)
    sender = BucketSender(build_plan(state, BLOCK), bucket_bytes=1 << 15)
    target = len(sender.buckets) - 1
    victim = sender.buckets[target].slots[0]

    def corrupt(k: int, payload: torch.Tensor) -> None:
        if k == target:
            payload[victim.offset + victim.nbytes // 2] ^= 0x10

    sender.on_payload = corrupt
    wire, end = pair()
    with pytest.raises(ConversionInputError, match=f"tensor '{victim.name}': digest"):
        sync_once(sender, receiver, state, wire, end)
    after = snapshot(receiver)
    assert after[victim.name] == before[victim.name]  # the corrupted bucket wrote nothing
    for slot in sender.buckets[target].slots:
        assert after[slot.name] == before[slot.name]


# ---- bucketed sending ---------------------------------------------------------------------------


@pytest.mark.parametrize("config", [BLOCK, CHANNEL, NO_QUANT])
@pytest.mark.parametrize("bucket_bytes", [256, 1 << 14, 1 << 30])
def test_bucketed_sending_gives_the_bytes_of_whole_tensors(config: Any, bucket_bytes: int) -> None:
    state = model_state(3)
    receiver = receiver_for(state, config)
    sender = BucketSender(build_plan(state, config), bucket_bytes=bucket_bytes)
    if bucket_bytes == 256:
        assert len(sender.buckets) == len(state)  # every tensor alone (each is larger than the bucket)
    if bucket_bytes == 1 << 30:
        assert len(sender.buckets) == 1
    wire, end = pair()
    result, error = sync_once(sender, receiver, state, wire, end)
    assert error is None and result.verdict.accepted
    want = whole_outputs(state, config)
    assert set(want) == set(receiver.buffers)
    for name, tensor in want.items():
        got = receiver.buffers[name]
        assert torch.equal(got.reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name
    assert result.tensors == len(want)


def test_nan_in_a_later_bucket_raises_naming_the_tensor() -> None:
    state = model_state(2)
    state["model.layers.1.self_attn.o_proj.weight"][3, 5] = float("nan")
    sender = BucketSender(build_plan(state, BLOCK), bucket_bytes=1 << 14)
    sender.transport = None
    with pytest.raises(ConversionInputError, match="o_proj"):
        sender.step(state)


def test_a_malformed_layout_is_refused() -> None:
    plan = build_plan(model_state(1), BLOCK)
    layout = layout_to_json(bucket_layout(plan, 1 << 14))
    assert [b.nbytes for b in layout_from_json(layout)] == [b["nbytes"] for b in layout]
    layout[0]["slots"][0][2] = layout[0]["nbytes"] + 1
    with pytest.raises(ConversionInputError, match="bucket 0: slot"):
        layout_from_json(layout)
    with pytest.raises(ConversionInputError, match="bucket_bytes"):
        bucket_layout(plan, 0)


# ---- memory ---------------------------------------------------------------------------------------


def peak_allocated(fn: Callable[[], Any]) -> int:
    """Peak bytes of CPU memory torch allocated (and had not yet freed) while ``fn`` ran, from the profiler."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    timeline = []
    for e in prof.events():
        if e.name == "[memory]":
            timeline.append((e.time_range.start, e.cpu_memory_usage))
        elif e.self_cpu_memory_usage > 0:
            timeline.append((e.time_range.start, e.self_cpu_memory_usage))
    current = peak = 0
    for _, delta in sorted(timeline):
        current += delta
        peak = max(peak, current)
    return peak


class Sink:
    """A wire that accepts every offer and drops the bytes (measures the sender alone)."""

    def isend(self, payload: torch.Tensor) -> Any:
        return _Done()

    def recv(self, payload: torch.Tensor) -> None:
        answer = json.dumps({"accepted": True, "diff": ""}).encode()
        if payload.dtype == torch.int64:
            payload.fill_(len(answer))
        else:
            payload.copy_(torch.frombuffer(bytearray(answer), dtype=torch.uint8))

    def irecv(self, payload: torch.Tensor) -> Any:
        raise AssertionError("the sender never receives asynchronously")


def test_peak_extra_memory_is_bounded_by_the_bucket_not_the_model() -> None:
    g = torch.Generator().manual_seed(1)
    state = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(256, 256, generator=g).bfloat16() for i in range(48)}
    plan = build_plan(state, BLOCK)
    model_out = sum(o.numel() * o.element_size() for o in whole_outputs(state, BLOCK).values())
    largest_src = 256 * 256 * 2
    bucket = 4 * (256 * 256 + 256)  # four tensors' outputs per bucket: 12 buckets
    sender = BucketSender(plan, bucket_bytes=bucket, transport=Sink())
    assert len(sender.buckets) == 12

    def whole() -> None:
        plan.allocate("cpu")
        plan.run(state)

    whole_peak = peak_allocated(whole)
    bucketed_peak = peak_allocated(lambda: sender.step(state))
    # the measurement sees what the whole-model step allocates: at least every output
    assert whole_peak >= model_out
    # two buckets in flight, plus one tensor's conversion scratch (float32 copies of one source)
    assert bucketed_peak <= 2 * bucket + 4 * largest_src, (bucketed_peak, bucket, model_out)
    assert bucketed_peak < model_out / 2
