"""`Conversion`: what a plugin registers for one byte format.

A conversion declares its outputs (:class:`~conversion_core.contract.outputs.Output`) and a
function that writes them into preallocated buffers. The seed's one-scale shape stays the
short form: ``fn(src, out, scale_out)`` with ``dst_dtype``, ``out_shape``, ``scale_shape``,
``scale_name`` and ``scale_dtype`` is the same as declaring two outputs. Either way the core
owns the argument checks, so every plugin's ``fn`` rejects a wrong buffer with the same clear
message before any byte is written, and notices a function that returned something instead of
writing, or swapped or resized a buffer's storage.

The buffers of a call are always what :meth:`Conversion.allocate` returns: one tensor per
declared output, or ``(out, scale_or_None)`` in the one-scale form. ``fn``, ``launch`` and
``dequantize`` take them in that order.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

import torch

from ..backend import use_triton
from ..errors import ConversionCoreError, ConversionInputError, ConversionTypeError, plugin_failure
from . import flags
from .outputs import (
    ELEMENTWISE,
    PER_BLOCK,
    WEIGHT,
    BlockAmax,
    Output,
    Shape,
    SharedAmax,
    TargetFormat,
    no_target_format,
)
from .tags import check_json_ready, freeze, thaw

#: ``fn(src, *buffers)``: writes ``src`` into the preallocated buffers; returns None.
ConvertFn = Callable[..., None]
#: ``launch(src, *buffers, flag)``: queue the conversion on the current CUDA stream, OR a
#: non-finite source into the int32 device ``flag``; no host sync, no allocation.
LaunchFn = Callable[..., None]
#: ``launch_group(items, flag)``: ``launch`` for a whole run of calls at once: ``items`` is a
#: sequence of ``(src, *buffers)`` (checked, non-empty, one device, any shapes and strides); queue
#: them all in a few kernel launches (a small device table of pointers, shapes and strides), OR
#: any non-finite source into ``flag``; no host sync. The plan also captures it in CUDA graphs:
#: the same items are launched once eagerly first, both inside one
#: :func:`conversion_core.contract.capture.session`, where anything the capture must not build
#: (a host-to-device copy of the table) is kept by the eager run and found again by the capture
#: (``conversion_core.formats.group_table`` does this for its tables). A plan passes a
#: :class:`conversion_core.contract.runs.SourceRun`, whose buffers and source shapes are fixed
#: from step to step (``group_table`` then reads only the sources' addresses and strides).
GroupLaunchFn = Callable[[Sequence[tuple[Any, ...]], torch.Tensor], None]

#: Source dtypes every conversion accepts unless it says otherwise.
FLOAT_SOURCE_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16, torch.float32)
#: The compile target of plain copies (a tensor in a float dtype, same shape): what a receiver
#: reads as raw weights. Anything else must say which kernel layout it is.
RAW_TARGET = "hf_raw"


def same_shape(src_shape: Sequence[int]) -> Shape:
    return tuple(src_shape)


def _no_scale(src_shape: Sequence[int]) -> Shape | None:
    return None


def _upcast(out: torch.Tensor, *companions: torch.Tensor | None) -> torch.Tensor:
    return out.float()


def is_dtensor(x: Any) -> bool:
    """True for a ``torch.distributed.tensor.DTensor``, without importing torch.distributed.tensor."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(x, dtensor.DTensor)


class ShardedExecutor(Protocol):
    """Converts a sharded (DTensor) source: the plan's sharded executor, a layer above this one."""

    def convert(self, conversion: Conversion, src: Any) -> tuple[Any, ...]: ...

    def convert_into(self, conversion: Conversion, src: Any, *buffers: Any) -> None: ...


#: Installed by the package (``conversion_core/__init__.py``) so that ``fn`` and ``convert`` take
#: DTensor sources without the contract importing the layers above it.
SHARDED_EXECUTOR: list[ShardedExecutor] = []


def set_sharded_executor(executor: ShardedExecutor) -> None:
    """Route DTensor sources of every conversion's ``fn`` and ``convert`` to ``executor``."""
    SHARDED_EXECUTOR[:] = [executor]


def sharded_executor() -> ShardedExecutor:
    if not SHARDED_EXECUTOR:
        raise ConversionTypeError("a DTensor source needs the sharded executor: import conversion_core first")
    return SHARDED_EXECUTOR[0]


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


#: Defaults of the one-scale fields; a conversion that declares ``outputs`` leaves them alone.
_ONE_SCALE_DEFAULTS: dict[str, Any] = {
    "dst_dtype": torch.bfloat16,
    "scale_shape": _no_scale,
    "scale_name": None,
    "out_shape": same_shape,
    "scale_dtype": torch.float32,
}


@dataclass(frozen=True, eq=False)
class Conversion:
    """One way of turning a source weight into the bytes a kernel expects.

    ``fn`` is always the checked callable: whatever function a plugin passes is wrapped so that
    its buffers are validated (dtype, shape, device, contiguity, presence) before it runs and
    its result afterwards. The plugin's own function stays reachable as ``raw_fn``.
    """

    name: str
    fn: ConvertFn
    requires_scale: bool
    dst_dtype: torch.dtype = torch.bfloat16
    scale_shape: Callable[[Shape], Shape | None] = _no_scale
    scale_name: str | None = None
    compile_target: str = RAW_TARGET
    compile_metadata: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    dequantize: Callable[..., torch.Tensor] = _upcast
    out_shape: Callable[[Shape], Shape] = same_shape
    scale_dtype: torch.dtype = torch.float32
    #: Source ranks the conversion accepts (None: any rank).
    src_ndims: tuple[int, ...] | None = None
    #: Source dtypes the conversion accepts.
    src_dtypes: tuple[torch.dtype, ...] = FLOAT_SOURCE_DTYPES
    #: Unchecked, sync-free twin of ``fn`` (see :data:`LaunchFn`); lets the whole-model plan queue a
    #: step's kernels (and capture them in a CUDA graph) with one NaN/Inf check at the end.
    launch: LaunchFn | None = None
    #: Grouped twin of ``launch`` (see :data:`GroupLaunchFn`): one launch converts a whole run of
    #: tensors, so sources at new addresses every step cost a table update, not a launch each.
    launch_group: GroupLaunchFn | None = None
    #: Every tensor written per source, in ``fn``'s order; empty: the one-scale fields above.
    outputs: Sequence[Output] = ()
    #: How the checkpoint convention a ``quantization_config`` names stores the outputs.
    target_format: Callable[[dict[str, Any]], TargetFormat] = no_target_format
    #: The statistic a sharded (DTensor) source reduces across ranks; None: elementwise only.
    sharded: BlockAmax | None = None
    #: A whole-tensor statistic (max |x|) the members of a fused set share; None: each tensor its own.
    shared_amax: SharedAmax | None = None
    #: True when ``outputs`` were declared (not derived from the one-scale fields).
    declares_outputs: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConversionTypeError(f"Conversion.name must be a non-empty str, got {self.name!r}")
        where = f"Conversion {self.name!r}"
        if not callable(self.fn):
            raise ConversionTypeError(f"{where}: fn must be callable, got {type(self.fn).__name__}")
        for attr in ("launch", "launch_group", "dequantize", "target_format"):
            value = getattr(self, attr)
            if value is not None and not callable(value):
                raise ConversionTypeError(f"{where}: {attr} must be callable")
        if not isinstance(self.requires_scale, bool):
            raise ConversionTypeError(f"{where}: requires_scale must be a bool")
        if self.launch_group is not None and self.launch is None:
            raise ConversionTypeError(f"{where}: launch_group needs launch too (the plan captures single launches)")
        if self.sharded is not None and not isinstance(self.sharded, BlockAmax):
            raise ConversionTypeError(f"{where}: sharded must be a conversion_core.BlockAmax or None")
        if self.shared_amax is not None and not isinstance(self.shared_amax, SharedAmax):
            raise ConversionTypeError(f"{where}: shared_amax must be a conversion_core.SharedAmax or None")
        for attr in ("dst_dtype", "scale_dtype"):
            if not isinstance(getattr(self, attr), torch.dtype):
                raise ConversionTypeError(f"{where}: {attr} must be a torch.dtype")
        if not isinstance(self.compile_target, str) or not self.compile_target:
            raise ConversionTypeError(f"{where}: compile_target must be a non-empty str")
        if not isinstance(self.compile_metadata, Mapping):
            raise ConversionTypeError(f"{where}: compile_metadata must be a mapping")
        check_json_ready(where, self.compile_metadata)
        object.__setattr__(self, "compile_metadata", freeze(self.compile_metadata))
        if self.outputs:
            self._adopt_declared_outputs(where)
        else:
            self._derive_one_scale_outputs(where)
        self._check_raw_target(where)
        object.__setattr__(self, "fn", _checked(self, getattr(self.fn, "__cc_raw__", self.fn)))

    def _adopt_declared_outputs(self, where: str) -> None:
        outputs = tuple(self.outputs)
        if not all(isinstance(o, Output) for o in outputs):
            raise ConversionTypeError(f"{where}: outputs must be a sequence of conversion_core.Output")
        names = [o.name for o in outputs]
        if len(set(names)) != len(names):
            raise ConversionTypeError(f"{where}: output names must be distinct, got {names}")
        changed = [k for k, v in _ONE_SCALE_DEFAULTS.items() if getattr(self, k) is not v and getattr(self, k) != v]
        if changed:
            raise ConversionTypeError(
                f"{where}: declare either outputs= or the one-scale fields, not both (also set: {', '.join(changed)})"
            )
        if self.requires_scale != (len(outputs) > 1):
            raise ConversionTypeError(
                f"{where}: requires_scale must be {len(outputs) > 1} for {len(outputs)} declared output(s) "
                "(True exactly when fn writes companion tensors)"
            )
        main = outputs[0]
        object.__setattr__(self, "outputs", outputs)
        object.__setattr__(self, "declares_outputs", True)
        # The one-scale fields describe the first two outputs, for readers of the short form.
        object.__setattr__(self, "dst_dtype", main.dtype)
        object.__setattr__(self, "out_shape", main.shape)
        if len(outputs) > 1:
            object.__setattr__(self, "scale_name", outputs[1].name)
            object.__setattr__(self, "scale_shape", outputs[1].shape)
            object.__setattr__(self, "scale_dtype", outputs[1].dtype)

    def _derive_one_scale_outputs(self, where: str) -> None:
        if self.requires_scale and self.scale_name is None:
            raise ConversionTypeError(f"{where}: requires_scale=True needs a scale_name")
        outputs = [Output(WEIGHT, self.dst_dtype, self.out_shape)]
        if self.requires_scale:
            assert self.scale_name is not None
            outputs.append(Output(self.scale_name, self.scale_dtype, self._one_scale_shape, PER_BLOCK))
        object.__setattr__(self, "outputs", tuple(outputs))

    def _one_scale_shape(self, src_shape: Shape) -> Shape:
        shape = self.scale_shape(tuple(src_shape))
        if shape is None:  # the plugin's bug, not the caller's: say so instead of "shape None"
            raise ConversionTypeError(
                f"conversion {self.name!r}: requires_scale=True but scale_shape({tuple(src_shape)}) returned None; "
                "the conversion must give a scale_shape"
            )
        return tuple(shape)

    def _check_raw_target(self, where: str) -> None:
        """``hf_raw`` means raw weights: one float (or source-dtype) output of the source's shape."""
        if self.compile_target != RAW_TARGET:
            return
        main = self.outputs[0]
        probe = (2, 3, 5) if self.src_ndims is None or 3 in self.src_ndims else (3, 5)
        try:
            same = tuple(main.shape(probe)) == probe
        except Exception:
            same = False
        plain = main.dtype.is_floating_point and main.dtype.itemsize >= 2 or main.dtype in self.src_dtypes
        if len(self.outputs) > 1 or not same or not plain:
            raise ConversionTypeError(
                f"{where}: its outputs are not plain copies of the source ({len(self.outputs)} output(s), main "
                f"{main.dtype}); declare the compile_target of the kernel layout they are, not {RAW_TARGET!r}"
            )

    # ---- what callers use --------------------------------------------------------------------
    @property
    def raw_fn(self) -> ConvertFn:
        """The plugin's own function, without the core's argument checks."""
        return self.fn.__cc_raw__  # type: ignore[attr-defined,no-any-return]

    @property
    def tags(self) -> dict[str, Any]:
        """What a publisher stamps on the bytes and a receiver checks with :func:`accepts`."""
        return {"compile_target": self.compile_target, "compile_metadata": thaw(self.compile_metadata)}

    @property
    def quantizes(self) -> bool:
        """True when the bytes depend on a statistic of the source (not a plain cast or copy)."""
        return self.requires_scale or self.compile_target != RAW_TARGET

    def output_shapes(self, src_shape: Sequence[int]) -> tuple[Shape, ...]:
        """Shape of every declared output for a source of ``src_shape``.

        A plugin's shape function that raises or returns something that is not a shape is named
        in one line (the plan, ``allocate`` and the checked ``fn`` all come through here)."""
        src = tuple(int(s) for s in src_shape)
        try:
            return tuple(tuple(int(s) for s in o.shape(src)) for o in self.outputs)
        except ConversionCoreError:
            raise
        except Exception as exc:
            raise ConversionTypeError(
                f"conversion {self.name!r}: its output shape function failed for source shape "
                f"{src}: {type(exc).__name__}: {exc}"
            ) from exc

    def expected_scale_shape(self, src_shape: Sequence[int]) -> Shape | None:
        """Shape of the second output (the scale of the one-scale form), None when there is none."""
        return self.output_shapes(src_shape)[1] if len(self.outputs) > 1 else None

    def calling(self, tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor | None, ...]:
        """The buffers of a call from one tensor per output: ``(out, None)`` for a scale-less short form."""
        if not self.declares_outputs and len(tensors) == 1:
            return (tensors[0], None)
        return tuple(tensors)

    def check_source(self, src: Any) -> None:
        """Refuse a source this conversion cannot read, naming what was expected."""
        where = f"conversion {self.name!r}"
        if not isinstance(src, torch.Tensor):
            raise ConversionTypeError(f"{where}: src must be a torch.Tensor, got {type(src).__name__}")
        self.check_shape(src.shape)
        if src.dtype not in self.src_dtypes:
            names = ", ".join(str(d) for d in self.src_dtypes)
            raise ConversionInputError(f"{where}: src dtype {src.dtype} is not one of {names}")

    def check_shape(self, shape: Sequence[int]) -> None:
        """Refuse a source rank this conversion does not handle (also before allocating)."""
        if self.src_ndims is not None and len(shape) not in self.src_ndims:
            ranks = " or ".join(f"{n}-D" for n in self.src_ndims)
            raise ConversionInputError(
                f"conversion {self.name!r}: source of shape {tuple(shape)} is {len(shape)}-D; expected {ranks} "
                "((N, K) weights or (E, N, K) stacked experts)"
            )
        if self.quantizes and 0 in tuple(shape):  # no statistic of nothing: refuse, never a raw error
            raise ConversionInputError(
                f"conversion {self.name!r}: source of shape {tuple(shape)} has no elements; "
                "a quantizing conversion needs a non-empty weight (keep empty tensors unconverted)"
            )

    def check_buffers(self, src: torch.Tensor, *buffers: Any) -> None:
        """The one place every plugin's arguments are validated."""
        self.check_source(src)
        where = f"conversion {self.name!r}"
        shapes = self._shapes_or_error(src.shape)
        if not self.declares_outputs:
            out = buffers[0] if buffers else None
            scale_out = buffers[1] if len(buffers) > 1 else None
            if len(buffers) > 2:
                raise ConversionTypeError(f"{where} takes (src, out, scale_out); got {len(buffers)} buffers")
            check_buffer(where, "out", out, shapes[0], self.dst_dtype, src.device)
            if self.requires_scale:
                if scale_out is None:
                    raise ConversionInputError(
                        f"{where} requires a scale buffer: pass scale_out of shape {shapes[1]} "
                        f"and dtype {self.scale_dtype} (see Conversion.allocate)"
                    )
                check_buffer(where, "scale_out", scale_out, shapes[1], self.scale_dtype, src.device)
            elif scale_out is not None:
                raise ConversionInputError(f"{where} writes no scale: pass scale_out=None")
            return
        if len(buffers) != len(self.outputs):
            names = ", ".join(o.name for o in self.outputs)
            raise ConversionTypeError(
                f"{where} writes {len(self.outputs)} outputs ({names}); got {len(buffers)} buffers "
                "(see Conversion.allocate)"
            )
        for output, shape, buf in zip(self.outputs, shapes, buffers, strict=True):
            check_buffer(where, f"output {output.name!r}", buf, shape, output.dtype, src.device)

    def _shapes_or_error(self, src_shape: Sequence[int]) -> tuple[Shape, ...]:
        return self.output_shapes(src_shape)

    def allocate(self, shape: Sequence[int], device: torch.device | str | None = None) -> tuple[Any, ...]:
        """Allocate the buffers for a source of ``shape``, once: ``(out, scale_or_None)`` in the
        one-scale form, one tensor per declared output otherwise."""
        shape = tuple(int(s) for s in shape)
        self.check_shape(shape)
        tensors = [
            torch.empty(s, dtype=o.dtype, device=device)
            for o, s in zip(self.outputs, self._shapes_or_error(shape), strict=True)
        ]
        return self.calling(tensors)

    def convert(self, src: torch.Tensor) -> tuple[Any, ...]:
        """Allocate buffers on ``src``'s device and convert into them (DTensor in, DTensors out)."""
        if is_dtensor(src):
            return sharded_executor().convert(self, src)
        self.check_source(src)
        buffers = self.allocate(src.shape, src.device)
        self.fn(src, *buffers)
        return buffers

    def convert_many(self, items: Iterable[Sequence[Any]]) -> None:
        """Convert every ``(src, *buffers)`` of ``items`` into its own buffers, as ``fn`` would.

        For a trainer with its own loop over tensors: each item is checked as ``fn`` checks it
        (a cheap signature compared with the item before, nothing recomputed for signatures seen
        before), then, when the conversion has a ``launch`` and the backend picks Triton, every
        kernel is queued without a host sync (in one grouped launch per run of same-shaped tensors
        with ``launch_group``) and one NaN/Inf flag is read at the end; on a flag each item is
        re-run through ``fn`` to name the culprit. Otherwise the items run one by one through the
        plugin's function. An error names the item's index. No autograd graph is recorded (a
        trainer's ``requires_grad`` weights), as in ``fn``. On any error the buffers' contents are
        unspecified.
        """
        fn = self.fn
        check = fn.__cc_check__  # type: ignore[attr-defined]
        short_form = not self.declares_outputs
        calls: list[tuple[Any, ...]] = []  # (src, *buffers), checked
        indices: list[int] = []  # their index in items (differs only after a DTensor item)
        device: torch.device | None = None
        one_device, empty = True, False
        for i, item in enumerate(items):
            call = item if type(item) is tuple else tuple(item)
            if short_form and len(call) == 2:
                call = (*call, None)  # (src, out) for a scale-less short form
            src = call[0] if call else None
            try:
                if type(src) is not torch.Tensor and is_dtensor(src):
                    fn(*call)
                    continue
                key = check(src, call[1:])
            except ConversionCoreError as exc:
                raise type(exc)(f"convert_many item {i}: {exc}") from exc
            # what the launch needs to know, read off the signature: (shape, dtype, device, ...)
            assert key is not None  # checked: src is a tensor
            if device is None:
                device = key[2]
            elif key[2] != device:
                one_device = False
            empty = empty or 0 in key[0]
            calls.append(call)
            indices.append(i)
        if not calls:
            return
        assert device is not None
        run = fn.__cc_run__  # type: ignore[attr-defined]
        if self.launch is None or not one_device or not use_triton(calls[0][0]):
            for i, call in zip(indices, calls, strict=True):
                self._run_named(i, call, run)
            return
        launched = calls
        if empty:  # sources with no elements: through fn, never a launch
            launched = [c for c in calls if c[0].numel()]
            for i, call in zip(indices, calls, strict=True):
                if not call[0].numel():
                    self._run_named(i, call, run)
        flag = flags.device_flag(device)
        try:
            with torch.no_grad():  # a requires_grad source: bytes out, never a graph on the buffers
                if self.launch_group is not None:
                    self.launch_group(launched, flag)
                else:
                    launch = self.launch
                    for call in launched:
                        launch(*call, flag)
        except (Exception, KeyboardInterrupt):
            flags.reset(flag)
            raise
        except BaseException as exc:  # noqa: B036  sys.exit(0) in a plugin's launch: a failure, never an exit
            flags.reset(flag)
            what = "launch_group" if self.launch_group is not None else "launch"
            raise plugin_failure(f"conversion {self.name!r}: {what}", exc) from exc
        if flags.flagged(flag):
            for i, call in zip(indices, calls, strict=True):
                if call[0].numel():
                    self._run_named(i, call, fn)
            raise ConversionCoreError(
                f"conversion {self.name!r}: a NaN/Inf was flagged in convert_many but no item failed when re-run"
            )

    def _run_named(self, index: int, call: tuple[Any, ...], run: Callable[..., None]) -> None:
        try:
            run(*call)
        except ConversionCoreError as exc:
            raise type(exc)(f"convert_many item {index}: {exc}") from exc

    def replace(self, **changes: Any) -> Conversion:
        """A copy with some fields changed (the checks are re-bound to the copy)."""
        if self.declares_outputs:  # the one-scale fields were derived from the outputs
            for key in _ONE_SCALE_DEFAULTS:
                changes.setdefault(key, _ONE_SCALE_DEFAULTS[key])
        else:  # the outputs were derived from the one-scale fields
            changes.setdefault("outputs", ())
        return dataclasses.replace(self, **changes)


def check_buffer(where: str, what: str, buf: Any, shape: Shape, dtype: torch.dtype, device: torch.device) -> None:
    """One buffer has exactly the expected shape, dtype and device, and is contiguous."""
    expected = f"expected shape {shape}, dtype {dtype}, device {device}, contiguous"
    if not isinstance(buf, torch.Tensor):
        raise ConversionTypeError(f"{where}: {what} must be a torch.Tensor ({expected}), got {type(buf).__name__}")
    if tuple(buf.shape) != shape or buf.dtype != dtype or buf.device != device:
        raise ConversionInputError(f"{where}: {what} has {_describe(buf)}; {expected}")
    if not buf.is_contiguous():
        raise ConversionInputError(f"{where}: {what} is not contiguous; {expected}")


#: Argument signatures a checked ``fn`` remembers as valid, per conversion (then cleared).
SEEN_SIGNATURES = 256


def _signature(src: torch.Tensor, buffers: Sequence[Any]) -> tuple[Any, ...] | None:
    """Everything ``check_buffers`` reads: equal signatures pass or fail the checks alike.

    Cheap identity only (shapes, strides, dtypes, devices; a buffer's contiguity follows from its
    shape and strides): no address, so buffers at new addresses hit the cache, and no device
    sync. None when an argument is not a tensor (the full check then explains what is wrong)."""
    key: tuple[Any, ...] = (src.shape, src.dtype, src.device)
    for b in buffers:
        if b is None:
            key += (None,)
        elif isinstance(b, torch.Tensor):
            key += (b.shape, b.stride(), b.dtype, b.device)
        else:
            return None
    return key


def _storages(buffers: Sequence[Any]) -> list[Any]:
    """Address, shape and strides of every buffer: what a ``set_`` or ``resize_`` would change."""
    out: list[Any] = []
    for b in buffers:
        if b is not None:
            out += (b.data_ptr(), b.shape, b.stride())
    return out


def _unmoved(buffers: Sequence[Any], key: tuple[Any, ...], addresses: Sequence[int]) -> bool:
    """The buffers still sit at ``addresses`` with the shapes and strides of their signature ``key``."""
    at, n = 3, 0  # a buffer's (shape, stride, dtype, device) follow the source's three fields
    for b in buffers:
        if b is None:
            at += 1
            continue
        if b.data_ptr() != addresses[n] or b.shape != key[at] or b.stride() != key[at + 1]:
            return False
        at, n = at + 4, n + 1
    return True


def _checked(conversion: Conversion, raw: ConvertFn) -> ConvertFn:
    """The checked ``fn``: full checks the first time a signature is seen, a lookup afterwards.

    What it adds per call when nothing changed is host time only (no device sync): one signature
    compared with the last call's, one ``set`` lookup when it differs, the buffers' addresses
    read before and after the plugin's function, grad mode switched off around it."""
    seen: set[tuple[Any, ...]] = set()
    last: list[Any] = [None]  # the last valid signature: compared before hashing into ``seen``
    short_form = not conversion.declares_outputs
    grad_enabled = torch.is_grad_enabled
    set_grad = torch._C._set_grad_enabled

    def check(src: Any, buffers: Sequence[Any]) -> tuple[Any, ...] | None:
        """Refuse wrong arguments; returns their signature (None: not all tensors, checked in full)."""
        key = _signature(src, buffers) if isinstance(src, torch.Tensor) else None
        if key is not None and (key == last[0] or key in seen):
            last[0] = key
            return key
        conversion.check_buffers(src, *buffers)
        if key is not None:
            if len(seen) >= SEEN_SIGNATURES:
                seen.clear()
            seen.add(key)
            last[0] = key
        return key

    def run(src: torch.Tensor, *buffers: Any, key: tuple[Any, ...] | None = None) -> None:
        """The plugin's function on checked arguments (``key``: their signature, when known), and
        the checks of what it did."""
        before = _storages(buffers) if key is None else [b.data_ptr() for b in buffers if b is not None]
        # a trainer's requires_grad weight: bytes out, never an autograd graph (detached, since
        # grad mode is per thread and a plugin may convert on worker threads)
        grad = grad_enabled()
        if grad:
            set_grad(False)
        try:
            result = raw(src.detach() if src.requires_grad else src, *buffers)  # type: ignore[func-returns-value]
        except KeyboardInterrupt as exc:  # the user's Ctrl-C still stops, saying what was running
            exc.add_note(f"conversion-core: interrupted in conversion {conversion.name!r}")
            raise
        except Exception:
            raise
        except BaseException as exc:  # noqa: B036  sys.exit(0) in a plugin's fn is a failure, never an exit
            raise plugin_failure(f"conversion {conversion.name!r}: fn", exc) from exc
        finally:
            if grad:
                set_grad(True)
        if result is not None:
            raise ConversionTypeError(
                f"conversion {conversion.name!r}: fn returned a {type(result).__name__}; it must write into the "
                "buffers it is given and return None (a returned tensor would be lost)"
            )
        if not (_unmoved(buffers, key, before) if key is not None else _storages(buffers) == before):
            raise ConversionTypeError(
                f"conversion {conversion.name!r}: fn moved or resized a buffer's storage (set_, resize_, ...); "
                "it must write into the buffers in place"
            )

    @functools.wraps(raw)
    def fn(src: torch.Tensor, *buffers: Any) -> None:
        if type(src) is not torch.Tensor and is_dtensor(src):
            sharded_executor().convert_into(conversion, src, *buffers)
            return None
        if short_form and len(buffers) == 1:
            buffers = (buffers[0], None)  # fn(src, out) for a scale-less short form
        run(src, *buffers, key=check(src, buffers))
        return None

    fn.__cc_raw__ = raw  # type: ignore[attr-defined]
    fn.__cc_check__ = check  # type: ignore[attr-defined]
    fn.__cc_run__ = run  # type: ignore[attr-defined]
    return fn


__all__ = [
    "ELEMENTWISE",
    "FLOAT_SOURCE_DTYPES",
    "RAW_TARGET",
    "Conversion",
    "ConvertFn",
    "GroupLaunchFn",
    "LaunchFn",
    "check_buffer",
    "is_dtensor",
    "same_shape",
]
