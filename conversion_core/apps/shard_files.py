"""safetensors shards read through a memory map and written tensor by tensor at known offsets.

Why not ``safe_open(...).get_tensor`` and ``save_file``: ``get_tensor`` copies every tensor out of
the file into fresh memory, and ``save_file`` needs every output of a shard in memory at once
before its first byte is written. Here a source tensor is a view of a private, read-only-in-use
memory map (the page cache, no copy), and an output file's header is written first from the
plan's output specs, so each output is written at its offset as soon as it exists and then freed.
A tensor that is kept as it is is copied file to file by the kernel (``copy_file_range``), never
through a second copy in this process.

The file format (a little-endian u64 header length, a JSON header of ``name -> {dtype, shape,
data_offsets}``, the data) is read and written exactly as the safetensors library does; every
malformed header is an error naming the file.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import mmap
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConversionInputError

#: safetensors header dtype codes.
SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
#: A header larger than this is refused (the safetensors library's own limit).
MAX_HEADER = 100_000_000
#: Bytes per copy_file_range / pread-pwrite call.
COPY_STEP = 1 << 28


def dtype_from_safetensors(code: str, where: str = "") -> torch.dtype:
    """torch dtype of a safetensors header dtype code (``BF16``, ``F32``, ...); ``where`` names the tensor."""
    try:
        return SAFETENSORS_DTYPES[code]
    except KeyError:
        raise ConversionInputError(
            f"{where}safetensors dtype {code!r} is not one of {', '.join(SAFETENSORS_DTYPES)}"
        ) from None


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes lie in a shard file (absolute byte offset)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


class MappedShard:
    """One safetensors file opened once: its header parsed, its data memory-mapped.

    :meth:`tensor` returns views of the map (no copy); :meth:`prefetch` asks the kernel to start
    reading a tensor's pages ahead of use; :meth:`release` drops a used tensor's pages from this
    process (they stay in the page cache), so resident memory stays near one tensor, not a shard.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDONLY)
        try:
            self.entries = self._read_header()
            size = os.fstat(self.fd).st_size
            self._map = mmap.mmap(self.fd, 0, access=mmap.ACCESS_COPY) if size else None
        except BaseException:
            os.close(self.fd)
            raise

    def _bad(self, what: str) -> ConversionInputError:
        return ConversionInputError(f"safetensors shard {self.path}: {what}")

    def _unique(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        """A JSON object of the header, refusing a key given twice (parsers differ on which one wins)."""
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                raise self._bad(f"the header names {key!r} twice; which entry is meant is ambiguous")
            seen[key] = value
        return seen

    def _read_header(self) -> dict[str, StoredTensor]:
        size = os.fstat(self.fd).st_size
        head = os.pread(self.fd, 8, 0)
        if len(head) < 8:
            raise self._bad(f"{size} bytes, too short for a header")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise self._bad(f"header length {n} does not fit the file ({size} bytes)")
        try:
            header = json.loads(os.pread(self.fd, n, 8), object_pairs_hook=self._unique)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise self._bad(f"header is not JSON: {exc}") from exc
        except RecursionError:
            raise self._bad("header is nested too deeply") from None
        if not isinstance(header, dict):
            raise self._bad("header is not a JSON object")
        base, data = 8 + n, size - 8 - n
        entries: dict[str, StoredTensor] = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype = dtype_from_safetensors(info["dtype"])
                shape = tuple(int(s) for s in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except ConversionInputError as exc:
                raise self._bad(f"tensor {name!r}: {exc}") from exc
            except (KeyError, TypeError, ValueError) as exc:
                raise self._bad(f"tensor {name!r}: malformed entry {info!r}") from exc
            nbytes = _numel(shape) * dtype.itemsize
            if min(shape, default=0) < 0 or not 0 <= begin <= end <= data or end - begin != nbytes:
                raise self._bad(
                    f"tensor {name!r}: data_offsets [{begin}, {end}] do not hold shape {list(shape)} "
                    f"of {info['dtype']} ({nbytes} bytes) within {data} data bytes"
                )
            entries[name] = StoredTensor(dtype, shape, base + begin, nbytes)
        return entries

    def stored(self, name: str) -> StoredTensor:
        try:
            return self.entries[name]
        except KeyError:
            raise self._bad(f"holds no tensor {name!r}") from None

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor as a view of the memory map (a copy only where its offset breaks alignment)."""
        st = self.stored(name)
        if st.nbytes == 0 or self._map is None:
            return torch.empty(st.shape, dtype=st.dtype)
        raw = torch.frombuffer(self._map, dtype=torch.uint8, count=st.nbytes, offset=st.offset)
        if st.offset % st.dtype.itemsize:
            raw = raw.clone()  # an unaligned offset (legal in the format): the one case that copies
        return raw.view(st.dtype).view(st.shape)

    def prefetch(self, name: str) -> None:
        """Start reading ``name``'s pages from disk now (asynchronously)."""
        st = self.stored(name)
        if st.nbytes and hasattr(os, "posix_fadvise"):
            with contextlib.suppress(OSError):
                os.posix_fadvise(self.fd, st.offset, st.nbytes, os.POSIX_FADV_WILLNEED)

    def release(self, name: str) -> None:
        """Drop ``name``'s whole pages from this process's memory (the map is private and unwritten)."""
        st = self.stored(name)
        page = mmap.PAGESIZE
        begin, end = -(-st.offset // page) * page, (st.offset + st.nbytes) // page * page
        if self._map is not None and end > begin and hasattr(mmap, "MADV_DONTNEED"):
            with contextlib.suppress(OSError, ValueError):
                self._map.madvise(mmap.MADV_DONTNEED, begin, end - begin)

    def close(self) -> None:
        """Unmap and close; a map still viewed by a live tensor is left to the garbage collector."""
        if self._map is not None:
            with contextlib.suppress(BufferError):
                self._map.close()
            self._map = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


#: ``sync_file_range`` flag: start writing the range's dirty pages back, without waiting.
SYNC_FILE_RANGE_WRITE = 2


@functools.cache
def _sync_file_range() -> Any:
    """libc's ``sync_file_range`` (Linux), or None where there is none."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing ``[offset, offset + nbytes)`` of ``fd`` to disk now.

    Why: dirty pages otherwise wait in the page cache (the background flusher starts at 10% of
    memory dirty), so every byte of a shard would go to disk inside its final ``fdatasync``, after
    the shard is converted. Started as each tensor is written, the disk writes while the next
    tensors are read and converted, and ``fdatasync`` waits only for the last few. Advisory: an
    error here is ignored (``fdatasync`` reports any real one).
    """
    fn = _sync_file_range()
    if fn is not None and nbytes > 0:
        fn(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE)


def _byte_view(t: torch.Tensor) -> memoryview:
    array: Any = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    return memoryview(array)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """An OS error on a descriptor (ENOSPC from pwrite carries no file name) names the file."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise


class ShardWriter:
    """A safetensors file whose header is written first, then each tensor at its offset, in any order.

    ``outputs``: ``(name, dtype, shape)`` in file order. Each write starts its own writeback
    (:func:`start_writeback`); :meth:`finish` checks every tensor was written, makes the file
    durable (``fdatasync``) and closes it.
    """

    def __init__(self, path: str | os.PathLike[str], outputs: Sequence[tuple[str, torch.dtype, Sequence[int]]]):
        self.path = Path(path)
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        self.slots: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        position = 0
        for name, dtype, shape in outputs:
            if dtype not in CODES:
                raise ConversionInputError(
                    f"output {name!r}: dtype {dtype} has no safetensors code ({', '.join(SAFETENSORS_DTYPES)})"
                )
            nbytes = _numel(shape) * dtype.itemsize
            header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [position, position + nbytes]}
            self.slots[name] = (dtype, tuple(shape), position, nbytes)
            position += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # data starts 8-byte aligned, as the library writes it
        self.base = 8 + len(text)
        self.size = self.base + position
        self._pending = set(self.slots)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with _naming(self.path):
                _pwrite_all(self.fd, memoryview(struct.pack("<Q", len(text)) + text), 0)
                os.ftruncate(self.fd, self.size)
        except BaseException:
            self.close()
            raise

    def _slot(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> tuple[int, int]:
        if name not in self.slots:
            raise ConversionInputError(f"{self.path}: no output {name!r} was declared")
        want_dtype, want_shape, offset, nbytes = self.slots[name]
        if (dtype, shape) != (want_dtype, want_shape):
            raise ConversionInputError(
                f"{self.path}: output {name!r} is {dtype} {list(shape)}, declared {want_dtype} {list(want_shape)}"
            )
        self._pending.discard(name)
        return self.base + offset, nbytes

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write a CPU tensor's bytes at its slot."""
        offset, _ = self._slot(name, tensor.dtype, tuple(tensor.shape))
        if tensor.numel():
            with _naming(self.path):
                _pwrite_all(self.fd, _byte_view(tensor), offset)
            start_writeback(self.fd, offset, tensor.numel() * tensor.element_size())

    def copy(self, name: str, src: MappedShard, src_name: str) -> None:
        """Copy a stored tensor's bytes file to file, in the kernel where it can."""
        st = src.stored(src_name)
        offset, nbytes = self._slot(name, st.dtype, st.shape)
        with _naming(self.path):
            self._copy_range(src, src_name, st.offset, offset, nbytes)

    def _copy_range(self, src: MappedShard, src_name: str, src_offset: int, offset: int, nbytes: int) -> None:
        done = 0
        while done < nbytes:
            step = min(COPY_STEP, nbytes - done)
            try:
                n = os.copy_file_range(src.fd, self.fd, step, src_offset + done, offset + done)
            except (AttributeError, OSError):
                n = 0
            if n <= 0:  # unsupported here (old kernel, some filesystems): through a bounded buffer
                data = os.pread(src.fd, step, src_offset + done)
                if not data:
                    raise ConversionInputError(f"{src.path}: tensor {src_name!r} ends before its data_offsets")
                _pwrite_all(self.fd, memoryview(data), offset + done)
                n = len(data)
            start_writeback(self.fd, offset + done, n)
            done += n

    def finish(self) -> None:
        """Every declared output written; the file durable and closed."""
        if self._pending:
            raise ConversionInputError(f"{self.path}: outputs never written: {sorted(self._pending)[:5]}")
        with _naming(self.path):
            os.fdatasync(self.fd)
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


__all__ = [
    "CODES",
    "SAFETENSORS_DTYPES",
    "MappedShard",
    "ShardWriter",
    "StoredTensor",
    "dtype_from_safetensors",
    "start_writeback",
]
