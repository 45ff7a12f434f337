"""Read a file that must lie inside the registered folders, without being fooled by a swapped link.

Checking a path and then opening it by name again leaves a window in which the file can be replaced
by a symlink to ``/etc/passwd``. ``read_inside`` closes it: it opens the path once, asks the
operating system where the opened file really is (``/proc/self/fd/N`` on Linux, ``F_GETPATH`` on
macOS; elsewhere it compares the descriptor's device and inode with those of the resolved path),
checks that place against the roots, and reads the bytes from that same descriptor. What was checked
is what is read. A loader then extracts text from those bytes (``Loader.load_bytes``), never from
the path again.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

READ_CHUNK = 1 << 20


class UnsafeFileError(ValueError):
    """A file that may not be read (outside the roots, not a regular file, too large, changed while
    it was being opened); the message says why and what to do."""


@dataclass
class CheckedFile:
    """Bytes read from a descriptor whose real location was checked."""

    path: str  # the real path of the opened file
    data: bytes
    size: int
    mtime: float


def is_inside(path: str, roots: Iterable[str]) -> bool:
    """Whether real path ``path`` lies in (or is) one of the real paths ``roots``."""
    for root in roots:
        root = root.rstrip(os.sep) or os.sep
        if path == root or path.startswith(root if root.endswith(os.sep) else root + os.sep):
            return True
    return False


def _open_flags() -> int:
    # O_NONBLOCK: opening a named pipe must not hang; it is a no-op for regular files.
    flags = os.O_RDONLY
    for name in ("O_NONBLOCK", "O_NOCTTY", "O_CLOEXEC", "O_BINARY"):
        flags |= getattr(os, name, 0)
    return flags


def descriptor_path(fd: int, opened_as: str, st: os.stat_result) -> str:
    """Where the file open on ``fd`` really is, as the kernel sees it.

    Linux and macOS answer from the descriptor itself. Elsewhere the path is resolved after the
    open and accepted only if it leads to the very same file (device and inode), so a swap between
    the open and the check is caught either way.
    """
    proc = f"/proc/self/fd/{fd}"
    if sys.platform.startswith("linux") and os.path.exists(proc):
        real = os.readlink(proc)
        if real.endswith(" (deleted)") and not os.path.exists(real):
            raise UnsafeFileError(f"{opened_as} was deleted while it was being read; try again")
        return real
    if sys.platform == "darwin":
        import fcntl

        raw = fcntl.fcntl(fd, fcntl.F_GETPATH, bytes(1024))
        return os.fsdecode(raw.split(b"\x00", 1)[0])
    real = os.path.realpath(opened_as)
    try:
        now = os.stat(real)
    except OSError:
        now = None
    if now is None or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
        raise UnsafeFileError(f"{opened_as} changed while it was being opened; try again")
    return real


def _too_large(path: str, size: int, max_bytes: int) -> UnsafeFileError:
    return UnsafeFileError(
        f"{path} is {size / 2**20:.1f} MB, over the {max_bytes / 2**20:g} MB limit (max_file_mb); "
        "raise it with `lorekeeper config set max_file_mb N` to read it"
    )


def _open(path: str) -> int:
    try:
        return os.open(path, _open_flags())
    except FileNotFoundError as exc:
        raise UnsafeFileError(f"{path} no longer exists on disk") from exc
    except PermissionError as exc:
        raise UnsafeFileError(f"permission denied reading {path}: check the file's permissions") from exc
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeFileError(f"{path} is a symlink loop; remove or fix the link") from exc
        raise UnsafeFileError(f"cannot open {path}: {exc.strerror or exc}") from exc


def read_inside(
    path: str | Path, roots: Iterable[str | Path], *, max_bytes: int, expect: str | None = None
) -> CheckedFile:
    """The bytes of ``path``, read from one descriptor whose real location lies inside ``roots``.

    ``expect`` (a real path) also requires the opened file to be that one: a document whose name
    was switched to another file inside the roots (an ignored one, say) is refused too. Files larger
    than ``max_bytes`` are refused, checked before reading and again while reading (a file that grows).
    """
    path = os.fspath(path)
    real_roots = [os.path.realpath(os.fspath(r)) for r in roots]
    fd = _open(path)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = (
                "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file (a pipe, socket or device)"
            )
            raise UnsafeFileError(f"{path} is {kind}")
        real = descriptor_path(fd, path, st)
        if not is_inside(real, real_roots):
            raise UnsafeFileError(f"{path} leads to a file outside the registered folders")
        if expect is not None and real != expect:
            raise UnsafeFileError(f"{path} changed into another file while it was being opened; try again")
        if st.st_size > max_bytes:
            raise _too_large(path, st.st_size, max_bytes)
        data = _read_at_most(fd, max_bytes + 1)
        if len(data) > max_bytes:
            raise _too_large(path, len(data), max_bytes)
        return CheckedFile(path=real, data=data, size=len(data), mtime=st.st_mtime)
    finally:
        os.close(fd)


def _read_at_most(fd: int, limit: int) -> bytes:
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    parts: list[bytes] = []
    got = 0
    while got < limit:
        piece = os.read(fd, min(READ_CHUNK, limit - got))
        if not piece:
            break
        parts.append(piece)
        got += len(piece)
    return b"".join(parts)
