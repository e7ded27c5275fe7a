"""Publishing a directory atomically and exclusively: DST is the old complete result or the new one.

One idea, no format: a writer builds its output in a temporary directory beside DST and this module
puts it at DST. Why a module of its own: the protocol has to hold against a concurrent run, a kill
(SIGKILL, SIGTERM, power loss) at any instruction, and OS errors, and that reasoning is independent of
what the directory holds.

Protocol (all names beside DST, in its parent, so every rename stays on one filesystem):

1. Check what can be checked before any work: the parent exists and is writable, DST is not a mount
   point (a rename onto or away from it fails with EBUSY/EXDEV), DST is a directory if it exists,
   a non-empty DST needs ``force``, and the longest name used (``.DST.old-XXXXXXXX``) fits NAME_MAX.
2. Claim DST: ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``.DST.lock``, held for the whole run; the file
   records the holder's pid. A second run fails at once naming DST and that pid. The kernel drops a
   flock when its holder dies, so a lock that can be taken means no live run owns DST. After taking
   it we check that the path still names the inode we locked (a finishing holder unlinks it), else
   retry.
3. Recover, under the lock (also done by :func:`tidy` before the early checks, so a run refused
   at once still cleans up): any ``.DST.tmp-XXXXXXXX`` / ``.DST.old-XXXXXXXX`` left there belongs to a dead run (a
   live one would hold the lock). If DST is missing and an ``.old`` exists, a run died between the
   two renames of a replace: the old complete result is renamed back to DST. Then the leftovers
   are removed.
4. Write into ``.DST.tmp-XXXXXXXX`` (mkdtemp, beside DST).
5. Make it durable: fsync every file, every directory in it, then the directory itself.
6. Re-check DST under the lock: a directory that appeared there during the run is not replaced
   unless ``force``.
7. Publish. No DST (or an empty one): ``rename(tmp, DST)`` -- atomic, replaces an empty directory.
   A non-empty DST with force: ``renameat2(tmp, DST, RENAME_EXCHANGE)`` swaps both in one atomic
   step (Linux >= 3.15, via ctypes), so DST is never missing; where that is unavailable (EINVAL,
   ENOSYS, no symbol): ``rename(DST, .DST.old-X)`` then ``rename(tmp, DST)``. A kill between those
   two leaves DST missing for an instant, and step 3 of the next run restores ``.old`` -- DST is
   always either the old complete directory or the new complete one, as observed by any later run.
   The parent directory is fsynced after the rename, then the old copy is removed.
8. Release: unlink ``.DST.lock`` while still holding it, then close.

Tests inject faults through :data:`fault_hook`: called with a step name at each write step.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..errors import ConversionInputError

#: Called with the step name at every write step (tests raise or SIGKILL there); None in production.
fault_hook: Callable[[str], None] | None = None

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def step(name: str) -> None:
    """Mark a write step (a seam for fault injection)."""
    if fault_hook is not None:
        fault_hook(name)


def lock_path(dst: Path) -> Path:
    return dst.parent / f".{dst.name}.lock"


def os_error_line(exc: OSError, what: Path) -> str:
    """One line naming the file an OS error is about."""
    name = exc.filename or what
    return f"writing {what} failed at {name}: {exc.strerror or exc}"


def check_destination(dst: Path, force: bool) -> None:
    """Step 1: everything checkable before the first byte is written."""
    d = dst.absolute()
    parent = d.parent
    if not parent.is_dir():
        raise ConversionInputError(f"the parent of DST, {parent}, does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConversionInputError(f"the parent of DST, {parent}, is not writable")
    try:
        name_max = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    longest = len(os.fsencode(f".{d.name}.old-00000000"))
    if longest > name_max:
        raise ConversionInputError(
            f"DST {dst}: name too long ({len(os.fsencode(d.name))} bytes; at most {name_max - 14} leave room "
            "for the temporary names beside it)"
        )
    if d.exists() or d.is_symlink():
        if d.is_symlink() or not d.is_dir():
            raise ConversionInputError(f"DST {dst} exists and is not a directory")
        if os.path.ismount(d):
            raise ConversionInputError(f"DST {dst} is a mount point; it cannot be replaced by a rename")
        if any(d.iterdir()) and not force:
            raise ConversionInputError(f"DST {dst} exists and is not empty; pass --force to replace it")


def _acquire(dst: Path) -> int:
    path = lock_path(dst)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            finally:
                os.close(fd)
            raise ConversionInputError(
                f"DST {dst} is being written by another run (pid {holder}, lock {path}); wait or pick another DST"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)  # the previous holder unlinked it after we opened it: lock the new one


#: The random part of a temporary name: mkdtemp's 8 characters, or ``old-``'s 8 hex digits.
_SUFFIX = re.compile(r"[a-z0-9_]{8}")


def _leftovers(dst: Path, kind: str) -> list[Path]:
    """This DST's own ``.DST.tmp-XXXXXXXX`` / ``.DST.old-XXXXXXXX``, never those of a DST whose name
    extends it (``.out.tmp-x.tmp-XXXXXXXX`` belongs to DST ``out.tmp-x``, maybe to a live run)."""
    prefix = f".{dst.name}.{kind}-"
    return sorted(
        p for p in dst.parent.iterdir() if p.name.startswith(prefix) and _SUFFIX.fullmatch(p.name[len(prefix) :])
    )


def recover(dst: Path) -> None:
    """Step 3 (call only holding the lock): undo what a dead run left."""
    olds = _leftovers(dst, "old")
    if olds and not (dst.exists() or dst.is_symlink()):
        os.rename(olds[-1], dst)  # a run died between the two renames of a replace
        _fsync_dir(dst.parent)
        olds = olds[:-1]
    for p in olds + _leftovers(dst, "tmp"):
        shutil.rmtree(p, ignore_errors=True)


def tidy(dst: Path) -> None:
    """Recover a dead run's leftovers now if no live run holds DST (a run refused early still cleans up)."""
    if not dst.parent.is_dir():
        return
    if not lock_path(dst).exists() and not (_leftovers(dst, "tmp") + _leftovers(dst, "old")):
        return
    try:
        fd = _acquire(dst)
    except ConversionInputError:
        return  # a live run owns DST; Publication.open() will say so
    try:
        recover(dst)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_path(dst))
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Step 5: every file, then every directory bottom-up, then ``root``."""
    for here, _dirs, files in os.walk(root, topdown=False):
        for f in files:
            fd = os.open(os.path.join(here, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(here))


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap ``a`` and ``b`` with renameat2; False where the system cannot."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


#: Tests set this False to exercise the two-rename fallback.
use_exchange = True


class Publication:
    """``with Publication(dst, force) as pub: write into pub.tmp; pub.publish()`` (see the module docstring)."""

    def __init__(self, dst: Path, force: bool) -> None:
        self.dst = Path(dst).absolute()
        self.force = force
        self.tmp: Path | None = None
        self._fd: int | None = None

    def open(self) -> Path:
        """Claim DST, recover a dead run's leftovers, check DST again, create the temporary directory."""
        self._fd = _acquire(self.dst)
        try:
            recover(self.dst)
            check_destination(self.dst, self.force)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.dst.name}.tmp-", dir=self.dst.parent))
            step("tmp-created")
        except BaseException:
            self._release()
            raise
        return self.tmp

    def __enter__(self) -> Publication:
        self.open()
        return self

    def publish(self) -> None:
        assert self.tmp is not None
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(self.tmp, 0o777 & ~mask)
        fsync_tree(self.tmp)
        step("fsynced")
        dst, tmp = self.dst, self.tmp
        check_destination(dst, self.force)  # step 6: what appeared at DST during the run
        if not dst.exists() or not any(dst.iterdir()):
            os.rename(tmp, dst)
            step("new-moved")
            self.tmp = None
        elif use_exchange and _exchange(tmp, dst):
            step("exchanged")  # tmp now holds the old result
        else:
            old = dst.parent / f".{dst.name}.old-{os.urandom(4).hex()}"
            os.rename(dst, old)
            step("old-moved")
            os.rename(tmp, dst)
            step("new-moved")
            self.tmp = old
        _fsync_dir(dst.parent)
        step("published")

    def _release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(lock_path(self.dst))
            os.close(self._fd)
            self._fd = None

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove the temporary (or replaced old) directory and release DST; safe to call twice."""
        try:
            if self.tmp is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                self.tmp = None
        finally:
            self._release()
