"""`Conversion` and `Rule`: what plugins register.

A :class:`Conversion` owns its byte format; the core owns the argument checks, so every
plugin's ``fn`` rejects a wrong buffer with the same clear message before any byte is written.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from .errors import ConversionInputError, ConversionTypeError

Shape = tuple[int, ...]
ConvertFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], None]
#: ``launch(src, out, scale_out, flag)``: queue the conversion on the current CUDA stream, OR
#: non-finite into the int32 device ``flag``, no host sync, no allocation (for grouped callers).
LaunchFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor], None]

#: Source dtypes every conversion accepts unless it says otherwise.
FLOAT_SOURCE_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16, torch.float32)


def _same_shape(src_shape: Sequence[int]) -> Shape:
    return tuple(src_shape)


def _no_scale(src_shape: Sequence[int]) -> Shape | None:
    return None


def _upcast(out: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    return out.float()


def _freeze(value: Any) -> Any:
    """Deep read-only copy: mappings become MappingProxyType, lists become tuples."""
    if isinstance(value, Mapping):
        return MappingProxyType({str(k): _freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    """Plain JSON-ready copy of a frozen value (tuples become lists)."""
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_thaw(v) for v in value]
    return value


def _check_json_ready(where: str, metadata: Mapping[str, Any]) -> None:
    """compile_metadata travels with the bytes as JSON: refuse what would not arrive intact."""
    try:
        if not _str_keys_only(metadata):
            raise TypeError("every mapping key must be a str")
        json.dumps(_thaw(metadata), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConversionTypeError(
            f"{where}: compile_metadata must hold only JSON values (str, int, float, bool, None, "
            f"lists, str-keyed mappings): {exc}"
        ) from None


def _str_keys_only(value: Any) -> bool:
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _str_keys_only(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_str_keys_only(v) for v in value)
    return True


def _is_dtensor(x: Any) -> bool:
    """DTensor sources go to conversion_core.distributed; never imports torch.distributed.tensor itself."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(x, dtensor.DTensor)


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


@dataclass(frozen=True, eq=False)
class Conversion:
    """One way of turning a source weight into the bytes a kernel expects.

    ``fn`` is always the checked callable: whatever function a plugin passes is wrapped so
    that ``out``/``scale_out`` are validated (dtype, shape, device, contiguity, presence)
    before it runs. The plugin's own function stays reachable as ``raw_fn``.
    """

    name: str
    fn: ConvertFn
    requires_scale: bool
    dst_dtype: torch.dtype = torch.bfloat16
    scale_shape: Callable[[Shape], Shape | None] = _no_scale
    scale_name: str | None = None
    compile_target: str = "hf_raw"
    compile_metadata: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    dequantize: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] = _upcast
    out_shape: Callable[[Shape], Shape] = _same_shape
    scale_dtype: torch.dtype = torch.float32
    #: Source ranks the conversion accepts (None: any rank).
    src_ndims: tuple[int, ...] | None = None
    #: Source dtypes the conversion accepts.
    src_dtypes: tuple[torch.dtype, ...] = FLOAT_SOURCE_DTYPES
    #: Unchecked, sync-free twin of ``fn`` (see :data:`LaunchFn`); lets the whole-model plan queue a
    #: step's kernels (and capture them in a CUDA graph) with one NaN/Inf check at the end.
    launch: LaunchFn | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConversionTypeError(f"Conversion.name must be a non-empty str, got {self.name!r}")
        where = f"Conversion {self.name!r}"
        if not callable(self.fn):
            raise ConversionTypeError(f"{where}: fn must be callable, got {type(self.fn).__name__}")
        if self.launch is not None and not callable(self.launch):
            raise ConversionTypeError(f"{where}: launch must be callable or None")
        if not isinstance(self.requires_scale, bool):
            raise ConversionTypeError(f"{where}: requires_scale must be a bool")
        for attr in ("dst_dtype", "scale_dtype"):
            if not isinstance(getattr(self, attr), torch.dtype):
                raise ConversionTypeError(f"{where}: {attr} must be a torch.dtype")
        if not isinstance(self.compile_target, str) or not self.compile_target:
            raise ConversionTypeError(f"{where}: compile_target must be a non-empty str")
        if not isinstance(self.compile_metadata, Mapping):
            raise ConversionTypeError(f"{where}: compile_metadata must be a mapping")
        if self.requires_scale and self.scale_name is None:
            raise ConversionTypeError(f"{where}: requires_scale=True needs a scale_name")
        _check_json_ready(where, self.compile_metadata)
        object.__setattr__(self, "compile_metadata", _freeze(self.compile_metadata))
        object.__setattr__(self, "fn", _checked(self, getattr(self.fn, "__cc_raw__", self.fn)))

    @property
    def raw_fn(self) -> ConvertFn:
        """The plugin's own function, without the core's argument checks."""
        return self.fn.__cc_raw__  # type: ignore[attr-defined,no-any-return]

    @property
    def tags(self) -> dict[str, Any]:
        """What a publisher stamps on the bytes and a receiver checks with :func:`accepts`."""
        return {"compile_target": self.compile_target, "compile_metadata": _thaw(self.compile_metadata)}

    def expected_scale_shape(self, src_shape: Sequence[int]) -> Shape | None:
        if not self.requires_scale:
            return None
        shape = self.scale_shape(tuple(src_shape))
        return None if shape is None else tuple(shape)

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

    def check_buffers(self, src: torch.Tensor, out: Any, scale_out: Any) -> None:
        """The one place every plugin's arguments are validated."""
        self.check_source(src)
        where = f"conversion {self.name!r}"
        want_out = tuple(self.out_shape(tuple(src.shape)))
        _check_buffer(where, "out", out, want_out, self.dst_dtype, src.device)
        if self.requires_scale:
            want_scale = self.expected_scale_shape(src.shape)
            if want_scale is None:  # the plugin's bug, not the caller's: say so instead of "shape None"
                raise ConversionTypeError(
                    f"{where}: requires_scale=True but scale_shape({tuple(src.shape)}) returned None; "
                    "the conversion must give a scale_shape"
                )
            if scale_out is None:
                raise ConversionInputError(
                    f"{where} requires a scale buffer: pass scale_out of shape {want_scale} "
                    f"and dtype {self.scale_dtype} (see Conversion.allocate)"
                )
            _check_buffer(where, "scale_out", scale_out, want_scale, self.scale_dtype, src.device)
        elif scale_out is not None:
            raise ConversionInputError(f"{where} writes no scale: pass scale_out=None")

    def allocate(
        self, shape: Sequence[int], device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Allocate the output (and scale) buffers for a source of ``shape``, once."""
        shape = tuple(int(s) for s in shape)
        self.check_shape(shape)
        out = torch.empty(tuple(self.out_shape(shape)), dtype=self.dst_dtype, device=device)
        scale_shape = self.expected_scale_shape(shape)
        scale = None
        if scale_shape is not None:
            scale = torch.empty(scale_shape, dtype=self.scale_dtype, device=device)
        return out, scale

    def convert(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Allocate buffers on ``src``'s device and convert into them (DTensor in, DTensors out)."""
        if _is_dtensor(src):
            from .distributed import convert as convert_dtensor

            return convert_dtensor(self, src)
        self.check_source(src)
        out, scale = self.allocate(src.shape, src.device)
        self.fn(src, out, scale)
        return out, scale

    def replace(self, **changes: Any) -> Conversion:
        """A copy with some fields changed (the checks are re-bound to the copy)."""
        return dataclasses.replace(self, **changes)


def _check_buffer(where: str, what: str, buf: Any, shape: Shape, dtype: torch.dtype, device: torch.device) -> None:
    expected = f"expected shape {shape}, dtype {dtype}, device {device}, contiguous"
    if not isinstance(buf, torch.Tensor):
        raise ConversionTypeError(f"{where}: {what} must be a torch.Tensor ({expected}), got {type(buf).__name__}")
    if tuple(buf.shape) != shape or buf.dtype != dtype or buf.device != device:
        raise ConversionInputError(f"{where}: {what} has {_describe(buf)}; {expected}")
    if not buf.is_contiguous():
        raise ConversionInputError(f"{where}: {what} is not contiguous; {expected}")


def _checked(conversion: Conversion, raw: ConvertFn) -> ConvertFn:
    @functools.wraps(raw)
    def fn(src: torch.Tensor, out: torch.Tensor, scale_out: torch.Tensor | None = None) -> None:
        if _is_dtensor(src):
            from .distributed import convert_into

            return convert_into(conversion, src, out, scale_out)
        conversion.check_buffers(src, out, scale_out)
        raw(src, out, scale_out)

    fn.__cc_raw__ = raw  # type: ignore[attr-defined]
    return fn


@dataclass(frozen=True)
class Rule:
    """Maps a ``quantization_config`` (a plain dict, ``{}`` when unquantized) to a conversion."""

    conversion: str
    predicate: Callable[[dict[str, Any]], bool]
    priority: int = 0
    name: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.conversion, str) or not self.conversion:
            raise ConversionTypeError(f"Rule.conversion must be a conversion name (str), got {self.conversion!r}")
        if not callable(self.predicate):
            raise ConversionTypeError(f"Rule {self.name or self.conversion!r}: predicate must be callable")
        if isinstance(self.priority, bool) or not isinstance(self.priority, int):
            raise ConversionTypeError(f"Rule {self.name or self.conversion!r}: priority must be an int")
        if not isinstance(self.name, str):
            raise ConversionTypeError(f"Rule for {self.conversion!r}: name must be a str")
