"""``conversion-core demo --sync``: one whole weight sync loop on one machine, no downloads.

Three processes on gloo (CPU):

- ranks 0 and 1, the trainer: the small Qwen3-MoE-style model (random weights, bf16) held as
  DTensors sharded ``Shard(0)`` over the two ranks. Every step an optimizer updates the shards, the
  plan converts them bucket by bucket (:class:`~conversion_core.plan.sync.BucketSender`) and rank 0
  sends each bucket while the next one converts;
- rank 2, the inference side: its own buffers, allocated from its own inference config for its own
  parameter names; it checks each update before any byte lands, applies the buckets (digests
  checked), dequantizes its buffers into a transformers model and runs a forward pass. Its logits
  must equal those of the trainer's model dequantized from an unsharded conversion of the same
  step's weights (computed on rank 0, independently of the sharded and bucketed paths).

Finally a sender of another format offers its update: the receiver refuses it, before any byte is
sent, and prints the diff; its buffers are unchanged. The parent prints one table row per step.
"""

from __future__ import annotations

import socket
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from ..errors import ConversionCoreError
from .demo_model import INFERENCE_CONFIGS, MODEL_CONFIG, build_model_state, data_path, load_json

TRAINERS = (0, 1)
RECEIVER = 2
PROMPT = [[1, 17, 42, 7, 99, 3, 250, 11]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _hf_model(state: dict[str, torch.Tensor] | None = None) -> Any:
    import transformers

    kwargs = load_json(data_path(MODEL_CONFIG))
    model_type = kwargs.pop("model_type")
    kwargs.pop("architectures", None)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(model_type, **kwargs))
    model.float().eval()
    if state is not None:
        model.load_state_dict(state, strict=True)
    return model


def _logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(PROMPT)).logits.float()


def dequantized_state(plan: Any) -> dict[str, torch.Tensor]:
    """float32 weights read back from a plan's current outputs (what the inference model computes with)."""
    return {e.name: plan.dequantize(e.name) for e in plan.entries}


def _trainer(rank: int, config: Path, wrong: Path, steps: int, bucket_bytes: int, seed: int, queue: Any) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from ..plan import build_plan
    from ..plan.sync import BucketSender, DistTransport, SyncRefused

    trainers = dist.new_group(list(TRAINERS))
    mesh = DeviceMesh.from_group(trainers, "cpu")
    full = build_model_state(load_json(data_path(MODEL_CONFIG)), seed)  # same seed: same weights on both ranks
    params = {
        n: torch.nn.Parameter(distribute_tensor(t, mesh, [Shard(0)], src_data_rank=None)) for n, t in full.items()
    }
    del full
    optimizer = torch.optim.AdamW(params.values(), lr=1e-2)
    plan = build_plan({n: (tuple(p.shape), p.dtype) for n, p in params.items()}, config)
    state = {n: p.detach() for n, p in params.items()}
    transport = DistTransport(RECEIVER) if rank == 0 else None
    sender = BucketSender(plan, bucket_bytes, like=state, transport=transport)
    noise = torch.Generator().manual_seed(seed + 1)
    for step in range(steps):
        for p in params.values():  # a stand-in gradient, the same on every rank, sharded like the weight
            g = torch.randn(p.shape, generator=noise).to(p.dtype)
            p.grad = distribute_tensor(g, mesh, [Shard(0)], src_data_rank=None)
        optimizer.step()
        stats = sender.step(state)
        whole = {n: t.full_tensor() for n, t in state.items()}  # type: ignore[attr-defined]  # the reference, outside the sync's memory bound
        if rank == 0:
            reference = build_plan(whole, config)
            reference.allocate("cpu")
            reference.run(whole)
            dist.send(_logits(_hf_model(dequantized_state(reference))), RECEIVER)
            queue.put(("sender", step, stats))
    if rank == 0:  # another format offers an update of the same weights: refused before any byte
        other = BucketSender(build_plan(whole, wrong), bucket_bytes, transport=transport)
        try:
            other.step(whole)
            queue.put(("wrong", "accepted", ""))
        except SyncRefused as exc:
            queue.put(("wrong", "refused", str(exc).splitlines()[0]))


def _receiver(config: Path, steps: int, queue: Any) -> None:
    import torch.distributed as dist

    from ..plan import build_plan
    from ..plan.sync import DistTransport, receive_update
    from ..selection import Receiver, digest

    dist.new_group(list(TRAINERS))  # every rank joins the creation of the trainers' group
    model = _hf_model()
    specs = {n: (tuple(t.shape), torch.bfloat16) for n, t in model.state_dict().items()}
    engine = build_plan(specs, config)  # the engine's weight layout, from its own config and names
    receiver = Receiver(engine.allocate("cpu"), config)
    transport = DistTransport(TRAINERS[0])
    previous = _logits(model)  # the receiver's random initial weights
    for step in range(steps):
        result = receive_update(receiver, transport)
        model.load_state_dict(dequantized_state(engine), strict=True)
        got = _logits(model)
        want = torch.empty_like(got)
        dist.recv(want, TRAINERS[0])
        moved = float((got - previous).abs().max())  # the update really landed: the logits moved
        previous = got
        queue.put(("receiver", step, result, float((got - want).abs().max()), float(want.abs().max()), moved))
    before = {n: digest(b) for n, b in receiver.buffers.items()}
    result = receive_update(receiver, transport)
    unchanged = before == {n: digest(b) for n, b in receiver.buffers.items()}
    queue.put(("refusal", result.verdict.diff(limit=3), unchanged, result.bytes_received))


def _worker(
    rank: int, port: int, config: Path, wrong: Path, steps: int, bucket_bytes: int, seed: int, queue: Any
) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # three processes on a small machine; also keeps matmuls deterministic
    try:
        dist.init_process_group(
            "gloo", rank=rank, world_size=3, init_method=f"tcp://127.0.0.1:{port}", timeout=timedelta(seconds=120)
        )
        if rank == RECEIVER:
            _receiver(config, steps, queue)
        else:
            _trainer(rank, config, wrong, steps, bucket_bytes, seed, queue)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        queue.put(("error", rank, traceback.format_exc()))
        raise


def run_sync_demo(fmt: str = "block", steps: int = 3, bucket_bytes: int = 512 << 10, seed: int = 0) -> dict[str, Any]:
    """Run the three processes; returns per-step sender and receiver records and the refusal."""
    import torch.multiprocessing as mp
    import transformers  # noqa: F401  imported once here, shared by the forked workers

    config = data_path(INFERENCE_CONFIGS[fmt])
    wrong = data_path(INFERENCE_CONFIGS["channel" if fmt == "block" else "block"])
    ctx = mp.get_context("fork")
    queue = ctx.SimpleQueue()
    args = (_free_port(), config, wrong, steps, bucket_bytes, seed, queue)
    procs = [ctx.Process(target=_worker, args=(rank, *args), daemon=True) for rank in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    records: list[tuple[Any, ...]] = []
    while not queue.empty():
        records.append(queue.get())
    errors = [r for r in records if r[0] == "error"]
    if errors or any(p.exitcode != 0 for p in procs):
        detail = errors[0][2].strip().splitlines()[-1] if errors else f"exit codes {[p.exitcode for p in procs]}"
        raise ConversionCoreError(f"demo --sync: a process failed: {detail}")
    return {
        "format": fmt,
        "wrong": wrong.name,
        "sender": {r[1]: r[2] for r in records if r[0] == "sender"},
        "receiver": {r[1]: r[2:] for r in records if r[0] == "receiver"},
        "offer": next(r[1:] for r in records if r[0] == "wrong"),
        "refusal": next(r[1:] for r in records if r[0] == "refusal"),
    }


def ok(report: dict[str, Any]) -> bool:
    """Every step accepted with matching logits; the other format refused, nothing written."""
    steps = report["receiver"]
    matched = all(
        r.verdict.accepted and diff <= 1e-5 * max(scale, 1.0) and moved > 0 for r, diff, scale, moved in steps.values()
    )
    diff, unchanged, received = report["refusal"]
    return bool(steps) and matched and report["offer"][0] == "refused" and unchanged and received == 0


def format_sync_report(report: dict[str, Any]) -> str:
    header = (
        "step",
        "verdict",
        "buckets",
        "MB sent",
        "convert ms",
        "wire wait ms",
        "sender ms",
        "apply ms",
        "max |dlogit|",
        "logits moved",
    )
    rows = [header]
    for step in sorted(report["sender"]):
        s = report["sender"][step]
        r, diff, _, moved = report["receiver"][step]
        rows.append(
            (
                str(step + 1),
                "accepted" if r.verdict.accepted else "REFUSED",
                str(s.buckets),
                f"{s.bytes_sent / 1e6:.2f}",
                f"{s.convert_s * 1e3:.1f}",
                f"{s.wait_s * 1e3:.1f}",
                f"{s.total_s * 1e3:.1f}",
                f"{r.apply_s * 1e3:.1f}",
                f"{diff:.2e}",
                f"{moved:.2e}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [f"trainer: 2 ranks, DTensor Shard(0), gloo; receiver: 1 process; {INFERENCE_CONFIGS[report['format']]}"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    diff, unchanged, received = report["refusal"]
    lines.append(
        f"sender for {report['wrong']}: {report['offer'][0]} before any byte ({received} bytes received, "
        f"receiver buffers unchanged: {'yes' if unchanged else 'NO'})"
    )
    lines += ["  " + line for line in diff.splitlines()]
    return "\n".join(lines)
